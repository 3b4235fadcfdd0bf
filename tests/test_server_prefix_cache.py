"""Prompt caching through the server: the official client sees usage.prompt_tokens_details.cached_tokens, and
/metrics counts cached prompt tokens."""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch
from test_server import WORDS, LiveServer, free_port, tiny_tokenizer

from omnimini.config import ModelConfig
from omnimini.model import OmniModel
from omnimini.serve.config import ServeConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=2048)
    model = OmniModel(cfg).eval()
    srv = LiveServer(ServeConfig(models=[("tiny", model, tok)], aliases={"gpt-4o-mini": "tiny"}, port=free_port(),
                                 max_batch=2, max_context=2048))
    yield srv
    srv.stop()


def test_second_request_sharing_a_long_prefix_reports_cached_tokens(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    rng = random.Random(0)
    system = " ".join(rng.choice(WORDS) for _ in range(1300))
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]  # noqa: E731
    first = client.chat.completions.create(model="gpt-4o-mini", messages=msgs("hello"), max_tokens=4)
    assert first.usage.prompt_tokens >= 1100
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model="gpt-4o-mini", messages=msgs("world json"), max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= 1024
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=msgs("paris"), max_tokens=4, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[0].prompt_tokens_details.cached_tokens >= 1024
    metrics = httpx.get(server.url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("omnimini_prompt_tokens_cached_total"))
    assert float(line.split()[-1]) >= 2048
    assert 'omnimini_prefix_cache_blocks{kind="capacity",model="tiny"}' in metrics
