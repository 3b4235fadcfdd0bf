import io

import torch

from omnimini.chat_cli import run_chat
from omnimini.engine.generate import GenRequest, generate
from omnimini.engine.sampling import SamplingParams
from omnimini.runtime import encode_messages, load_for_inference, local_stream_fn


def test_terminal_chat_runs_on_the_in_process_engine(tiny_ckpt):
    model, tok = load_for_inference(str(tiny_ckpt / "model"))
    stream = local_stream_fn(model, tok, temperature=0.0, max_tokens=6)
    msgs = [{"role": "user", "content": "The quick"}]
    engine_text = "".join(stream(msgs))
    ids, _ = encode_messages(model, tok, msgs)
    want = generate(model, [GenRequest(ids, SamplingParams(temperature=0, max_tokens=6))], tok.eos_token_ids)[0]
    assert engine_text == tok.decode(want, skip_special=True)  # the engine and the plain generator agree
    out = io.StringIO()
    rc = run_chat(stream_fn=stream, stdin=io.StringIO(f"/image {tiny_ckpt / 'red.png'}\nwhat colour?\n/quit\n"),
                  stdout=out)
    assert rc == 0 and "assistant" in out.getvalue().lower()


def test_encode_messages_places_image_tokens(tiny_ckpt):
    model, tok = load_for_inference(str(tiny_ckpt / "model"))
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (9, 9))},
                                         {"type": "text", "text": "hi"}]}]
    ids, pixels = encode_messages(model, tok, msgs)
    assert pixels.shape == (1, 3, 32, 32)
    assert ids.count(tok.image_token_id) == model.config.vision.tokens_per_image
    assert isinstance(pixels, torch.Tensor)
