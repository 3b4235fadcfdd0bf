import asyncio

import torch
from PIL import Image

from omnimini.eval.local import LocalRunner, make_local_client
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer


def _runner(tiny_ckpt):
    return LocalRunner(OmniModel.from_pretrained(tiny_ckpt / "model"), Tokenizer.from_dir(tiny_ckpt / "model"),
                       batch_size=3)


def test_loglikelihood_matches_a_direct_forward_pass(tiny_ckpt):
    r = _runner(tiny_ckpt)
    ctx, conts = "The quick brown", [" fox", " dog jumps", " images"]
    got = r.loglikelihood([(ctx, conts), ("Omni models", [" see"])])
    assert len(got) == 2 and len(got[0]) == 3 and len(got[1]) == 1
    for c, score in zip(conts, got[0], strict=True):
        whole = r.tok.encode(ctx + c)
        n = len(whole) - len(r.tok.encode(ctx))
        with torch.no_grad():
            logp = r.model(torch.tensor([whole])).logits[0].log_softmax(-1)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(len(whole) - n, len(whole)))
        assert abs(score - want) < 1e-4


def test_in_process_client_generates_with_images(tiny_ckpt):
    client = make_local_client(str(tiny_ckpt / "model"))
    img = Image.new("RGB", (20, 20), (0, 200, 0))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "colour?"}]}]

    async def go():
        return await asyncio.gather(client.chat(msgs, max_tokens=5, temperature=0),
                                    client.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0))

    a, b = asyncio.run(go())
    assert a.error is None and b.error is None
    assert isinstance(a.text, str) and isinstance(b.text, str)
