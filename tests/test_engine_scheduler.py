"""Engine: continuous batching equals running alone, chunked prefill, KV budget queueing, sampling features."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from omnimini.config import ModelConfig, VisionConfig
from omnimini.engine.generate import GenRequest, generate
from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineClosedError, EngineRequest, RequestTooLargeError, _holdback
from omnimini.engine.structured import GrammarError, schema_constraint
from omnimini.model import OmniModel
from omnimini.tokenizer import Tokenizer

WORDS = "the quick brown fox jumps over a lazy dog hello world json schema tool call weather paris".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)))
    return Tokenizer.train([str(path)], 400, show_progress=False)


def tiny_model(tok, vision: bool = False, seed: int = 0, max_seq_len: int = 256) -> OmniModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=max_seq_len,
                      vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, pixel_shuffle=2) if vision else None,
                      image_token_id=tok.image_token_id if vision else None)
    m = OmniModel(cfg).eval()
    with torch.no_grad():  # peakier logits than the 0.02 init: greedy choices are far from ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def engine(model, tok):
    eng = Engine(model, tok, max_batch=4, prefill_chunk=7)
    yield eng
    eng.shutdown()


def prompts(tok, k=5):
    rng = random.Random(1)
    return [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))) for _ in range(k)]


def alone(model, tok, ids, params):
    return generate(model, [GenRequest(ids, params)], tok.eos_token_ids)[0]


def test_continuous_batching_matches_running_alone(engine, model, tok):
    ps = prompts(tok, 7)  # more requests than slots: some wait, join as others leave
    lens = [3, 17, 9, 25, 5, 12, 8]
    reqs = [EngineRequest(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in zip(ps, lens, strict=True)]
    results = engine.generate(reqs, timeout=60)
    for p, n, r in zip(ps, lens, results, strict=True):
        ref = alone(model, tok, p, SamplingParams(temperature=0, max_tokens=n))
        assert r.completions[0].token_ids == ref
        assert r.completions[0].finish_reason == ("length" if len(ref) == n else "stop")
        assert r.prompt_tokens == len(p)


def test_chunked_prefill_equals_unchunked(model, tok):
    p = prompts(tok, 1)[0] * 4
    params = SamplingParams(temperature=0, max_tokens=10)
    outs = []
    for chunk in (3, 1000):
        eng = Engine(model, tok, max_batch=2, prefill_chunk=chunk)
        outs.append(eng.generate([EngineRequest(p, params)])[0].completions[0].token_ids)
        eng.shutdown()
    assert outs[0] == outs[1] == alone(model, tok, p, params)


def test_requests_join_while_others_decode(model, tok):
    """A request submitted mid-stream starts before the running one finishes (no batch barrier)."""
    eng = Engine(model, tok, max_batch=4, prefill_chunk=16)
    order = []
    done = threading.Event()

    def sink(name):
        def f(ev):
            order.append((name, ev.finish_reason))
            if ev.finish_reason and name == "long":
                done.set()
        return f

    ps = prompts(tok, 2)
    eng.submit(EngineRequest(ps[0], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True),
                             request_id="long"), sink("long"))
    while len(order) < 3:
        time.sleep(0.005)
    eng.submit(EngineRequest(ps[1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                             request_id="short"), sink("short"))
    assert done.wait(60)
    eng.shutdown()
    finished = [name for name, reason in order if reason]
    assert finished == ["short", "long"]
    first_short = next(i for i, (n, _) in enumerate(order) if n == "short")
    assert any(n == "long" for n, _ in order[first_short:])  # the long stream kept flowing afterwards


def test_kv_budget_queues_requests(model, tok):
    p = prompts(tok, 1)[0][:10]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    eng = Engine(model, tok, max_batch=4, kv_budget_tokens=len(p) + 20)  # room for exactly one sequence
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}

    def sink(name):
        def f(ev):
            starts.setdefault(name, time.monotonic())
            if ev.finish_reason:
                ends[name] = time.monotonic()
        return f

    eng.submit(EngineRequest(p, params, request_id="a"), sink("a"))
    eng.submit(EngineRequest(p, params, request_id="b"), sink("b"))
    deadline = time.time() + 60
    while len(ends) < 2 and time.time() < deadline:
        assert eng.stats.running <= 1
        time.sleep(0.002)
    eng.shutdown()
    assert starts["b"] >= ends["a"]  # b waited for a's KV reservation to be released
    with pytest.raises(RequestTooLargeError):
        eng.check(EngineRequest(p, SamplingParams(max_tokens=200)))


def test_prompt_too_long_and_bad_requests(engine, tok):
    with pytest.raises(RequestTooLargeError, match="maximum context length is 256"):
        engine.check(EngineRequest(list(range(5)) * 60))
    with pytest.raises(RequestTooLargeError, match="empty"):
        engine.check(EngineRequest([]))


def test_seed_determinism_and_n(engine, tok):
    p = prompts(tok, 1)[0]
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=12)
    a = engine.generate([EngineRequest(p, params, n=3)])[0]
    b = engine.generate([EngineRequest(p, params, n=3)])[0]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len({tuple(c.token_ids) for c in a.completions}) > 1  # the n sequences differ
    other = engine.generate([EngineRequest(p, SamplingParams(temperature=1.0, seed=7, max_tokens=12))])[0]
    assert other.completions[0].token_ids != a.completions[0].token_ids


def test_stop_strings_are_not_emitted(engine, tok):
    p = prompts(tok, 1)[0]
    full = engine.generate([EngineRequest(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])[0]
    text = full.completions[0].text
    stop = text[5:8]  # likely spans a token boundary
    cut = engine.generate([EngineRequest(p, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                           ignore_eos=True))])[0].completions[0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"
    assert _holdback("abc <|to", ["<|tool"]) == 4


def test_logprobs_penalties_and_bias(engine, tok):
    p = prompts(tok, 1)[0]
    r = engine.generate([EngineRequest(p, SamplingParams(temperature=0, max_tokens=6, logprobs=True,
                                                         top_logprobs=3, ignore_eos=True))])[0].completions[0]
    assert len(r.logprobs) == 6
    for lp, t in zip(r.logprobs, r.token_ids, strict=True):
        assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][2] == pytest.approx(lp.logprob, abs=1e-5)  # greedy picks the top entry
        assert bytes(lp.bytes) == tok.token_bytes(t)
    banned = r.token_ids[0]
    b = engine.generate([EngineRequest(p, SamplingParams(temperature=0, max_tokens=6, logit_bias={banned: -100},
                                                         ignore_eos=True))])[0].completions[0]
    assert banned not in b.token_ids
    rep = engine.generate([EngineRequest(p, SamplingParams(temperature=0, max_tokens=20, frequency_penalty=2.0,
                                                           presence_penalty=2.0, ignore_eos=True))])[0]
    toks = rep.completions[0].token_ids
    assert max(toks.count(t) for t in toks) <= max(r.token_ids.count(t) for t in r.token_ids) + 3


def test_json_schema_constraint(engine, tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    c = schema_constraint(tok, schema)
    r = engine.generate([EngineRequest(prompts(tok, 1)[0], SamplingParams(temperature=0.8, seed=4, max_tokens=60),
                                       constraint=c, n=2)])[0]
    import json

    import jsonschema

    for comp in r.completions:
        assert comp.finish_reason == "stop", comp.text
        jsonschema.validate(json.loads(comp.text), schema)
    with pytest.raises(GrammarError):
        schema_constraint(tok, {"type": "nonsense"})


def test_images_are_encoded_once_and_chunked(tok):
    m = tiny_model(tok, vision=True)
    tpi = m.config.vision.tokens_per_image
    ids = tok.encode("hello world ") + [tok.image_token_id] * tpi + tok.encode(" the fox")
    pix = torch.randn(1, 3, 32, 32)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = generate(m, [GenRequest(ids, params, pix)], tok.eos_token_ids)[0]
    calls = []
    orig = m.encode_images
    m.encode_images = lambda px: calls.append(1) or orig(px)
    eng = Engine(m, tok, max_batch=2, prefill_chunk=3)  # placeholders split over several chunks
    with pytest.raises(ValueError, match="image placeholder"):
        eng.check(EngineRequest([tok.image_token_id, 5]))
    out = eng.generate([EngineRequest(ids, params, pixels=pix)])[0].completions[0].token_ids
    eng.shutdown()
    assert out == ref and len(calls) == 1


def test_async_stream_and_abort_frees_slot(model, tok):
    eng = Engine(model, tok, max_batch=1)
    p = prompts(tok, 1)[0]

    async def main():
        got = []
        agen = eng.stream(EngineRequest(p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)))
        async for ev in agen:
            got.append(ev)
            if len(got) == 3:
                break
        await agen.aclose()  # a client that went away
        r = await asyncio.to_thread(eng.generate, [EngineRequest(p, SamplingParams(temperature=0, max_tokens=3))],
                                    30)
        return got, r

    got, r = asyncio.run(main())
    assert len(got) == 3 and r[0].completions[0].token_ids
    assert eng.stats.requests_finished.get("abort") == 1
    eng.shutdown()
    assert eng._free_slots == [0]


def test_graceful_shutdown_finishes_in_flight_work(model, tok):
    eng = Engine(model, tok, max_batch=2)
    events = []
    eng.submit(EngineRequest(prompts(tok, 1)[0], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)),
               events.append)
    eng.shutdown(wait=True, timeout=60)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 15
    with pytest.raises(EngineClosedError):
        eng.submit(EngineRequest([1, 2, 3]), events.append)
    # cancelling shutdown: in-flight requests end with "abort" at once
    eng2 = Engine(model, tok, max_batch=2)
    ev2 = []
    eng2.submit(EngineRequest(prompts(tok, 1)[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)),
                ev2.append)
    while not ev2:
        time.sleep(0.005)
    eng2.shutdown(wait=False)
    assert ev2[-1].finish_reason == "abort"
