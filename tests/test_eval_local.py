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


def test_loglik_run_reports_tokens_scored_and_contexts_cut(tiny_ckpt, tmp_path, capsys):
    """The local loglik path reports its throughput in tokens and counts the contexts it cut from the left to
    fit the model's context (tiny model: 96 tokens; one question is far longer)."""
    import json

    from test_eval_tasks import write_mmlu

    from omnimini.cli import main

    long_q = "Which of these words comes last in the long list " + "of many many words " * 60 + "?"
    short = ["Bones in a hand?", "27", "12", "5", "100", "A"]

    def scoring(rows, name):
        data = write_mmlu(tmp_path / name, rows={"anatomy": rows}, dev={})
        rc = main(["eval", "--model", str(tiny_ckpt / "model"), "--tasks", "mmlu", "--mode", "loglik",
                   "--quantize", "none", "--data", str(data), "--out", str(tmp_path / name / "o")])
        assert rc == 0
        return json.loads((tmp_path / name / "o" / "results.json").read_text())["tasks"]["mmlu"]["scoring"]

    base = scoring([short], "short")
    sc = scoring([short, [long_q, "a", "b", "c", "d", "D"]], "long")
    # (the tiny tokenizer spends a token per character or two: even the short prompt may not fit 96 tokens)
    assert sc["truncated"] == base["truncated"] + 4  # the long item's four continuations, each cut the same way
    assert sc["tokens_scored"] > base["tokens_scored"] and sc["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "tokens scored" in out and f"{sc['truncated']} contexts cut from the left" in out


def test_in_process_loglik_calls_take_many_items_at_once(tmp_path):
    """An in-process client keeps its preferred number of items in flight (not --concurrency's 8), so one
    log-likelihood call sees many contexts and can sort them by length."""
    from test_eval_tasks import write_mmlu

    from omnimini.eval.clients import InProcessClient
    from omnimini.eval.runner import RunConfig, run

    rows = {"anatomy": [[f"Question {i}?", "a", "b", "c", "d", "A"] for i in range(40)]}
    data = write_mmlu(tmp_path / "data", rows=rows, dev={})
    client = InProcessClient(lambda b, p: ["A"] * len(b), lambda items: [[0.0, -1.0, -2.0, -3.0] for _ in items],
                             max_batch=256, max_wait_s=0.05)
    res = run(client, RunConfig(tasks=["mmlu"], data_dir=data, mode="loglik", concurrency=8))
    assert res["tasks"]["mmlu"]["n_items"] == 40 and res["tasks"]["mmlu"]["metrics"]["overall"]["mean"] == 1.0
    assert max(client.batch_sizes) > 8
