"""`/v1/embeddings` with the official `openai` client against a live 127.0.0.1 server (tiny random model).

The reference is the model itself: mean of `OmniModel.forward(ids).hidden` over the input's tokens, normalised.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
from test_server import LiveServer, free_port, tiny_model, tiny_tokenizer

from omnimini.serve.config import ServeConfig

KEY = "sk-embed"
TEXTS = ["the quick brown fox", "hello", "json schema tool call weather paris " * 6, "lazy dog"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    model = tiny_model(tok, False)
    cfg = ServeConfig(models=[("main", model, tok)], aliases={"text-embedding-3-small": "main"}, port=free_port(),
                      api_keys=[KEY], max_batch=2, max_context=256, state_dir=str(tmp_path_factory.mktemp("st")))
    srv = LiveServer(cfg)
    yield srv, tok, model
    srv.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        h = model(torch.tensor([ids])).hidden[0]
    return F.normalize(h.mean(0), dim=-1)


def test_batch_matches_reference_in_order(client, stack):
    _, tok, model = stack
    r = client.embeddings.create(model="text-embedding-3-small", input=TEXTS, encoding_format="float")
    assert r.object == "list" and [d.index for d in r.data] == list(range(len(TEXTS)))
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode_prompt(t)) for t in TEXTS)
    for text, d in zip(TEXTS, r.data, strict=True):
        v = torch.tensor(d.embedding)
        assert v.shape == (model.config.hidden_size,)
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
        # padded batching (inputs of different lengths) gives each input what it gives alone
        torch.testing.assert_close(v, reference(model, tok.encode_prompt(text)), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(torch.tensor(r.data[0].embedding), torch.tensor(r.data[1].embedding))


def test_base64_tokens_and_dimensions(client, stack):
    _, tok, model = stack
    floats = client.embeddings.create(model="main", input="the quick brown fox", encoding_format="float")
    b64 = client.embeddings.create(model="main", input="the quick brown fox")  # the client asks for base64
    torch.testing.assert_close(torch.tensor(b64.data[0].embedding), torch.tensor(floats.data[0].embedding))
    raw = httpx.post(stack[0].url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "main", "input": "hello", "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    ids = tok.encode_prompt("the quick brown fox")
    by_ids = client.embeddings.create(model="main", input=[ids, ids[:2]], encoding_format="float")
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), torch.tensor(floats.data[0].embedding))
    assert by_ids.usage.prompt_tokens == len(ids) + 2
    small = client.embeddings.create(model="main", input="the quick brown fox", dimensions=16,
                                     encoding_format="float")
    v = torch.tensor(small.data[0].embedding)
    assert v.shape == (16,) and v.norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(v, F.normalize(torch.tensor(floats.data[0].embedding)[:16], dim=0))


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[1, 2], [999999]]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": {"text": "x"}}, "input"),
])
def test_bad_input(stack, body, param):
    srv = stack[0]
    r = httpx.post(srv.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "main", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(srv.url + "/health").status_code == 200


def test_embedder_matches_transformers_mean_pooling(tmp_path):
    """Against transformers: a Llama's padded batch, last_hidden_state mean-pooled over the attention mask."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from test_weights_gguf import tiny_llama, write_gguf

    from omnimini.serve.embeddings import Embedder
    from omnimini.weights.gguf_loader import load_gguf

    ref = tiny_llama()
    model, _ = load_gguf(write_gguf(tmp_path / "m.gguf", ref), progress=False)
    seqs = [[5, 9, 40, 77, 100, 3, 250], [12, 13], [200, 201, 202, 203]]
    ours = Embedder(model.eval(), pad_id=0)(seqs)
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        h = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
