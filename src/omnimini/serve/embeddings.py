"""`POST /v1/embeddings`: mean-pooled final hidden states of the served model, L2-normalised.

The vectors come from the model's one forward (`OmniModel.forward(..., logits_for="none")` returns the final,
normed hidden states without the LM head). Inputs are batched by length, right-padded with a key mask, and the
pooling averages only real tokens; the answer keeps the request's order.
"""

from __future__ import annotations

import base64
import threading
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from omnimini.serve.errors import bad_request

MAX_INPUTS = 2048  # as OpenAI
FORWARD_TOKENS = 4096  # padded tokens per forward: bounds the activation memory of one batch


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def token_inputs(body: EmbeddingsRequest, tok, context: int) -> list[list[int]]:
    """The request's inputs as token-id lists (strings: literal text, no chat template, BOS if the model wants it)."""
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise bad_request("input must not be an empty list", "input")
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"input has {len(raw)} items; at most {MAX_INPUTS} are allowed", "input")
    if all(isinstance(x, int) for x in raw):
        raw = [raw]  # one pre-tokenized input
    out = []
    for i, x in enumerate(raw):
        ids = tok.encode_prompt(x, allow_special=False) if isinstance(x, str) else list(x)
        if not ids:
            raise bad_request(f"input[{i}] is empty", "input")
        if any(not 0 <= t < tok.vocab_size for t in ids):
            raise bad_request(f"input[{i}] contains token ids outside the vocabulary (0..{tok.vocab_size - 1})",
                              "input")
        if len(ids) > context:
            raise bad_request(f"input[{i}] is {len(ids)} tokens; this model's maximum context length is {context}",
                              "input", "context_length_exceeded")
        out.append(ids)
    return out


class Embedder:
    """Embeds token-id lists with one served model; one batch at a time (called from a worker thread)."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self._lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, inputs: list[list[int]]) -> torch.Tensor:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), self.model.config.hidden_size)
        start = 0
        with self._lock:
            while start < len(order):
                end = start + 1  # grow the batch while the padded size stays in budget (lengths ascend)
                while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= FORWARD_TOKENS:
                    end += 1
                idx = order[start:end]
                out[idx] = self._batch([inputs[i] for i in idx])
                start = end
        return out

    def _batch(self, seqs: list[list[int]]) -> torch.Tensor:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        dev = self.model.embed.weight.device
        h = self.model(ids.to(dev), attention_mask=mask.to(dev), logits_for="none").hidden.float().cpu()
        m = mask[..., None].float()
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def check_dimensions(dimensions: int | None, hidden: int) -> None:
    if dimensions is not None and dimensions > hidden:
        raise bad_request(f"dimensions={dimensions} is larger than this model's embedding size {hidden}",
                          "dimensions")


def shape_vectors(vecs: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """Truncate to `dimensions` (then renormalise), as OpenAI's text-embedding-3 models do."""
    return vecs if dimensions is None else F.normalize(vecs[:, :dimensions], dim=-1)


def embeddings_response(model: str, vecs: torch.Tensor, encoding: str, n_tokens: int) -> dict:
    def enc(v: torch.Tensor):
        if encoding == "base64":  # little-endian float32, what the openai client decodes
            return base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
        return v.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vecs)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
