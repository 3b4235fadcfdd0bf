"""The shared-context log-likelihood path against the plain per-option full forward it replaces."""

import pytest
import torch

from omnimini.eval.local import LocalRunner
from omnimini.eval.loglik import Group, encode_pair, fit_to_context, plan_batches
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer


def _runner(tiny_ckpt, **kw):
    torch.set_num_threads(1)
    return LocalRunner(OmniModel.from_pretrained(tiny_ckpt / "model"), Tokenizer.from_dir(tiny_ckpt / "model"),
                       **kw)


def _full_forward(model, tok, context, cont):
    """The old way: one full row per option, logits and log-softmax at every position, truncated from the left
    to the model's context (lm-evaluation-harness keeps max_len + 1 tokens, the last one only a target)."""
    ctx, c = encode_pair(tok, context, cont)
    L = model.config.max_seq_len
    whole = (ctx + c)[-(L + 1):]
    n = min(len(c), L)
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
    return sum(float(logp[p - 1, whole[p]]) for p in range(len(whole) - n, len(whole)))


LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)  # far past max_seq_len=96 tokens
ITEMS = [
    ("The quick brown", [" fox", " dog jumps over", " images and words here", " a"]),
    ("Omni models", [" see"]),
    ("Question: what is red?\nAnswer:", [" A", " B", " C", " D"]),
    (LONG, [" end", " the lazy dog again and again"]),
    (LONG + " more", [" x"]),
    ("A", [" b c d e f g"]),
    ("The quick brown", [" cat"]),  # the same context again, in another item
]


def test_fast_loglikelihood_equals_per_option_full_forward(tiny_ckpt):
    r = _runner(tiny_ckpt)
    got = r.loglikelihood(ITEMS)
    assert [len(g) for g in got] == [len(c) for _, c in ITEMS]
    for (ctx, conts), scores in zip(ITEMS, got, strict=True):
        for c, s in zip(conts, scores, strict=True):
            want = _full_forward(r.model, r.tok, ctx, c)
            assert abs(s - want) <= 1e-4, (ctx[:20], c, s, want)
    assert r.truncated == 3  # the three over-long requests, counted


def test_token_budget_batches_keep_input_order(tiny_ckpt):
    r = _runner(tiny_ckpt, token_budget=64)  # forces many batches, in length order, not input order
    got = r.loglikelihood(ITEMS)
    assert r.batches >= 4
    want = [[_full_forward(r.model, r.tok, ctx, c) for c in conts] for ctx, conts in ITEMS]
    for g, w in zip(got, want, strict=True):
        assert max(abs(a - b) for a, b in zip(g, w, strict=True)) <= 1e-4
    big = _runner(tiny_ckpt, token_budget=100_000)
    for g, w in zip(big.loglikelihood(ITEMS), want, strict=True):
        assert max(abs(a - b) for a, b in zip(g, w, strict=True)) <= 1e-4
    assert big.batches < r.batches


def test_plan_batches_respects_budget_and_sorts_by_length():
    groups = [Group(list(range(n)), [(i, [1])]) for i, n in enumerate([5, 40, 12, 40, 3, 25])]
    batches = plan_batches(groups, token_budget=80)
    lengths = [len(g.prefix) for b in batches for g in b]
    assert lengths == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) == 1 or max(len(g.prefix) for g in b) * len(b) <= 80
    assert sorted(i for b in batches for g in b for i, _ in g.members) == list(range(6))
    assert len(plan_batches([Group(list(range(500)), [(0, [1])])], token_budget=10)) == 1  # too big: alone


def test_encode_pair_splits_like_lm_evaluation_harness(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt / "model")
    # trailing space moves to the continuation
    ctx, cont = encode_pair(tok, "The quick ", "brown")
    assert ctx == tok.encode("The quick") and cont == tok.encode("The quick brown")[len(ctx):]
    # a continuation that merges with the context's last token: split the joint encoding at the context's length
    for context, c in [("The qu", "ick"), ("Omni mod", "els see")]:
        ctx, cont = encode_pair(tok, context, c)
        whole = tok.encode(context + c)
        assert ctx == tok.encode(context) and cont == whole[len(ctx):]
    ctx, cont = encode_pair(tok, "", " fox")  # empty context: one EOS to condition on
    assert len(ctx) == 1 and cont == tok.encode(" fox")


def test_fit_to_context_truncates_from_the_left():
    ctx, cont, cut = fit_to_context(list(range(100)), [7, 8, 9], max_len=10)
    assert cut and cont == [7, 8, 9] and ctx == list(range(92, 100)) and len(ctx) + len(cont) == 11
    assert fit_to_context([1, 2], [3], max_len=10) == ([1, 2], [3], False)
    ctx, cont, cut = fit_to_context([1], list(range(50)), max_len=10)
    assert cut and len(cont) == 10 and len(ctx) == 1


def test_limit_zero_is_a_clear_error(capsys):
    from omnimini.eval.cli import main

    assert main(["eval", "--tasks", "mmlu", "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "Traceback" not in err


def test_eval_without_model_uses_the_default_model(monkeypatch):
    from omnimini.eval import cli, clients

    seen = []
    monkeypatch.setattr(clients, "make_local_client", lambda spec, quantize: seen.append((spec, quantize)) or "client")
    args = cli.main.__globals__["argparse"].Namespace(model=None, endpoint=None, quantize="auto")
    # None = the default model (load_any)
    assert cli.make_client(args) == "client" and seen == [(None, "auto")]
    bad = cli.main.__globals__["argparse"].Namespace(model=None, endpoint=None, quantize="q3")
    with pytest.raises(ValueError, match="--quantize: unknown mode 'q3'"):
        cli.make_client(bad)
    both = cli.main.__globals__["argparse"].Namespace(model="x", endpoint="http://127.0.0.1:1/v1")
    try:
        cli.make_client(both)
    except ValueError as exc:
        assert "not both" in str(exc)
    else:
        raise AssertionError("--model with --endpoint must be refused")
