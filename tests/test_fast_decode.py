"""The compiled decode step (engine/fast_decode.py) computes what the eager model computes.

torch.compile runs Inductor's C++ backend here (a compiler is needed; the first compile of each graph takes a
few seconds for these 2-layer models and is cached afterwards).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_scheduler import WORDS, alone, tok  # noqa: F401  (tok is a fixture)

from omnimini.config import ModelConfig, MoEConfig
from omnimini.engine import fast_decode
from omnimini.engine.fast_decode import FastDecoder, supports
from omnimini.engine.quant import quantize_model
from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineRequest
from omnimini.model import OmniModel

# Gemma 3's options: a sliding layer (own rope base) then a global one, embedding scale, query scale, sandwich
# norms, GeGLU
GEMMA_LIKE = dict(sliding_window=8, layer_types=["sliding", "full"], rope_theta=1e6, rope_local_theta=1e4,
                  embed_scale=8.0, attn_scale=0.3, sandwich_norm=True, hidden_act="gelu_tanh")


def tiny(vocab: int, qk_norm: str = "none", bias: bool = False, moe: bool = False, **options) -> OmniModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256, qk_norm=qk_norm, attention_bias=bias,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate=32) if moe else None, **options)
    m = OmniModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m


def eager_and_fast(model, B: int, prompt: int, steps: int):
    """Prefill B random prompts of different lengths, then decode `steps` tokens with both paths."""
    g = torch.Generator().manual_seed(0)
    cache_e, cache_f = model.new_cache(B + 1, 128), model.new_cache(B + 1, 128)
    slots = torch.arange(1, B + 1)  # not 0..B-1: the engine decodes arbitrary slot subsets
    lens = torch.tensor([prompt - i for i in range(B)])
    ids = torch.randint(5, model.config.vocab_size, (B, prompt), generator=g)
    with torch.inference_mode():
        for cache in (cache_e, cache_f):
            model(ids, cache=cache, slots=slots, positions=torch.arange(prompt).expand(B, prompt))
    fast = FastDecoder(model, cache_f)
    tokens, pos = ids[:, -1], lens.clone()  # shorter rows restart at their own length (ragged batch)
    out = []
    for _ in range(steps):
        with torch.inference_mode():
            ref = model(tokens[:, None], cache=cache_e, slots=slots, positions=pos[:, None],
                        logits_for="last").logits[:, -1]
        got = fast(tokens, pos, slots)
        out.append((ref, got))
        tokens, pos = ref.argmax(-1), pos + 1
    return out


@pytest.mark.parametrize("qk_norm,bias,batches", [("none", False, (1, 3)), ("head", True, (3,)),
                                                  ("full", False, (3,))])
def test_compiled_decode_equals_eager_float32(tok, qk_norm, bias, batches, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fast_decode, "KV_BUCKET", 32)  # so that the 60 steps cross key-length buckets (32, 64)
    model = tiny(tok.vocab_size, qk_norm, bias)
    for B in batches:
        for ref, got in eager_and_fast(model, B, prompt=9, steps=60):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B", [1, pytest.param(3, marks=pytest.mark.slow)])  # each batch size: a fresh compile
def test_compiled_decode_with_gemma_options_equals_eager(tok, B, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fast_decode, "KV_BUCKET", 32)
    model = tiny(tok.vocab_size, "head", **GEMMA_LIKE)
    assert supports(model) is None
    for ref, got in eager_and_fast(model, B, prompt=9, steps=40):  # positions 9..48: past the window of 8
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_compiled_decode_runs_int8_weights(tok):  # noqa: F811
    model = quantize_model(tiny(tok.vocab_size), "int8")
    for ref, got in eager_and_fast(model, 2, prompt=5, steps=4):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_moe_models_are_refused_with_a_reason(tok):  # noqa: F811
    model = tiny(tok.vocab_size, moe=True)
    assert "MoE" in supports(model)
    with pytest.raises(ValueError, match="MoE"):
        FastDecoder(model, model.new_cache(1, 16))


def test_engine_with_compiled_decode_matches_generate(tok):  # noqa: F811
    model = quantize_model(tiny(tok.vocab_size), "fp16")  # packed fp16 weights reach the graph as a custom op
    engine = Engine(model, tok, max_batch=3, compile_decode=True)
    try:
        rng = random.Random(3)
        ps = [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20)))) for _ in range(5)]
        reqs = [EngineRequest(p, SamplingParams(temperature=0, max_tokens=12)) for p in ps]
        results = engine.generate(reqs, timeout=300)
        assert engine._fast is not None  # the compiled path was used, not the eager fallback
        for p, r in zip(ps, results, strict=True):
            assert r.completions[0].token_ids == alone(model, tok, p, SamplingParams(temperature=0, max_tokens=12))
    finally:
        engine.shutdown()


def test_no_recompile_up_to_the_end_of_the_cache(tok):  # noqa: F811
    """After warm-up, decoding every position up to the cache's last one compiles nothing new (a key slice as long
    as the cache tensor itself used to make Dynamo specialise and recompile: minutes, mid-serving)."""
    from torch._dynamo.utils import counters

    model = tiny(tok.vocab_size)
    cache = model.new_cache(2, 2 * fast_decode.KV_BUCKET)
    fast = FastDecoder(model, cache)
    fast.warm_up(1)
    before = counters["stats"]["unique_graphs"]
    for p in range(cache.max_len):
        fast(torch.tensor([5]), torch.tensor([p]), torch.tensor([0]))
    assert counters["stats"]["unique_graphs"] == before
