"""Automatic prefix caching: cached prefixes give the logits a fresh prefill gives, LRU eviction keeps serving,
images key on their content."""

from __future__ import annotations

import random
import time

import pytest
import torch
from test_engine_scheduler import WORDS, tiny_model, tok  # noqa: F401  (tok is a fixture)

from omnimini.engine.prefix_cache import block_keys
from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineRequest


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return tiny_model(tok, max_seq_len=1536)


def words(tokenizer, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(" " + " ".join(rng.choice(WORDS) for _ in range(64)))
    return ids[:n]


class Recorder:
    """Records the logits rows the engine samples from (its private _accept), per request id."""

    def __init__(self, engine: Engine):
        self.rows: dict[str, list[torch.Tensor]] = {}
        inner = engine._accept

        def accept(s, logits):
            self.rows.setdefault(s.req.id, []).append(logits.clone())
            inner(s, logits)

        engine._accept = accept


def run(engine: Engine, ids: list[int], max_tokens: int = 6, pixels=None):
    req = EngineRequest(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), pixels=pixels)
    return req.request_id, engine.generate([req], timeout=120)[0]


def test_cached_prefix_gives_fresh_logits_and_reports_cached_tokens(model, tok):  # noqa: F811
    system = words(tok, 1100, 1)
    a, b = system + words(tok, 20, 2), system + words(tok, 25, 3)
    cached = Engine(model, tok, max_batch=2, prefill_chunk=256, prefix_cache_tokens=4096)
    fresh = Engine(model, tok, max_batch=2, prefill_chunk=256, prefix_cache_tokens=0)
    try:
        rec_c, rec_f = Recorder(cached), Recorder(fresh)
        # both pools start small and grow as they fill (a server's memory follows what it has served)
        assert cached.cache.capacity == 256 and cached.prefix_cache.allocated_blocks == 8
        grown, reserve = [], cached.cache.reserve
        cached.cache.reserve = lambda n: (reserve(n), grown.append(cached.cache.capacity))
        first = run(cached, a)[1]
        assert first.cached_tokens == 0
        rid_c, res_c = run(cached, b)
        rid_f, res_f = run(fresh, b)
        assert res_c.cached_tokens >= 1024 and res_c.cached_tokens % 32 == 0
        assert res_f.cached_tokens == 0 and fresh.prefix_cache is None
        assert res_c.completions[0].token_ids == res_f.completions[0].token_ids
        for x, y in zip(rec_c.rows[rid_c], rec_f.rows[rid_f], strict=True):
            assert torch.allclose(x, y, atol=1e-5, rtol=0), (x - y).abs().max()
        # the whole prompt pooled: all but the last block is reused, the last token is always prefilled
        rid_again, again = run(cached, b)
        assert again.cached_tokens == (len(b) - 1) // 32 * 32
        assert torch.allclose(rec_c.rows[rid_again][0], rec_f.rows[rid_f][0], atol=1e-5, rtol=0)
        assert cached.stats.prompt_tokens_cached_total == res_c.cached_tokens + again.cached_tokens
        pc = cached.prefix_cache
        assert pc.used_blocks <= pc.allocated_blocks < pc.capacity
        # the slots' cache grew for the 1,100-token prompts and went back once the engine was idle
        assert max(grown) >= len(b)
        deadline = time.monotonic() + 5
        while cached.cache.capacity != 256 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cached.cache.capacity == 256
    finally:
        cached.shutdown()
        fresh.shutdown()


def test_requests_arriving_together_share_the_first_ones_blocks(model, tok):  # noqa: F811
    system = words(tok, 700, 4)
    eng = Engine(model, tok, max_batch=4, prefill_chunk=128, prefix_cache_tokens=4096)
    try:
        reqs = [EngineRequest(system + words(tok, 10, 10 + i), SamplingParams(temperature=0, max_tokens=3))
                for i in range(3)]
        res = eng.generate(reqs, timeout=120)
        # prefill is FIFO chunk by chunk, so the later requests find the first one's blocks as they are computed
        assert res[0].cached_tokens == 0
        assert res[1].cached_tokens >= 512 and res[2].cached_tokens >= 512
    finally:
        eng.shutdown()


def test_eviction_under_a_small_budget_keeps_serving_correctly(model, tok):  # noqa: F811
    small = Engine(model, tok, max_batch=2, prefill_chunk=64, prefix_cache_tokens=128)  # 4 blocks
    fresh = Engine(model, tok, max_batch=2, prefill_chunk=64, prefix_cache_tokens=0)
    try:
        # 3 prefixes of 3+ blocks compete for 4 blocks; each is asked twice in a row, so the second one hits
        prompts = [words(tok, 100 + 7 * i, 20 + (i // 2) % 3) for i in range(8)]
        for p in prompts:
            got = run(small, p, 5)[1]
            want = run(fresh, p, 5)[1]
            assert got.completions[0].token_ids == want.completions[0].token_ids
            assert small.prefix_cache.used_blocks <= 4
        assert small.prefix_cache.stats.evicted_blocks > 0
        assert small.stats.prompt_tokens_cached_total > 0
    finally:
        small.shutdown()
        fresh.shutdown()


def test_images_with_different_content_do_not_share_cache(tok):  # noqa: F811
    model = tiny_model(tok, vision=True, max_seq_len=1536)
    tpi = model.config.vision.tokens_per_image
    text = words(tok, 64, 5)
    ids = text + [tok.image_token_id] * tpi + words(tok, 70, 6)
    torch.manual_seed(1)
    img_a, img_b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    cached = Engine(model, tok, max_batch=2, prefix_cache_tokens=2048)
    fresh = Engine(model, tok, max_batch=2, prefix_cache_tokens=0)
    try:
        rec_c, rec_f = Recorder(cached), Recorder(fresh)
        run(cached, ids, pixels=img_a)
        rid_b, res_b = run(cached, ids, pixels=img_b)
        # the token ids are identical; only the blocks before the image may be reused
        assert res_b.cached_tokens == 64
        rid_f, _ = run(fresh, ids, pixels=img_b)
        assert torch.allclose(rec_c.rows[rid_b][0], rec_f.rows[rid_f][0], atol=1e-5, rtol=0)
        same = run(cached, ids, pixels=img_b.clone())[1]  # equal content: reused past the image
        assert same.cached_tokens == (len(ids) - 1) // 32 * 32
    finally:
        cached.shutdown()
        fresh.shutdown()


def test_block_keys_chain_the_prefix():
    a = block_keys(list(range(100)), 32)
    b = block_keys(list(range(64)) + [7] * 36, 32)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    c = block_keys([1] + list(range(1, 100)), 32)  # a change in block 0 changes every later key
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_the_image_placeholder_is_never_sampled(tok):  # noqa: F811
    eng = Engine(tiny_model(tok, vision=True), tok, max_batch=1)
    try:  # even when a logit bias makes it the most likely token by far
        p = SamplingParams(temperature=0, max_tokens=8, logit_bias={tok.image_token_id: 100.0})
        res = eng.generate([EngineRequest(words(tok, 20, 9), p)])[0]
        assert tok.image_token_id not in res.completions[0].token_ids
    finally:
        eng.shutdown()
