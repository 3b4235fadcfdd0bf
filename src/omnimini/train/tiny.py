"""A tiny, fast training setup (a few-thousand-parameter MoE on a small text file) for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = {
    "vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
    "intermediate_size": 64, "max_seq_len": 64, "qk_norm": "head", "tie_embeddings": True,
    "moe": {"num_experts": 4, "top_k": 2, "expert_intermediate": 32, "first_k_dense": 0},
}

SAMPLE_TEXT = (
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.\n\n"
    "Once upon a time there was a little fox who liked to run in the green forest.\n\n"
    "One, two, three, four, five. Six, seven, eight, nine, ten.\n\n"
)


def write_corpus(path: str | Path, repeats: int = 40) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(repeats):
        lines.append(SAMPLE_TEXT.replace("little", ["little", "small", "quick", "brave"][i % 4]))
    p.write_text("".join(lines))
    return p


def tiny_tokenizer(corpus: str | Path, out_dir: str | Path, vocab_size: int = 320):
    from omnimini.tokenizer import Tokenizer

    tok = Tokenizer.train([str(corpus)], vocab_size, show_progress=False)
    tok.save(out_dir)
    return tok


def tiny_config(out_dir, tokenizer_dir, corpus, **kw) -> dict:
    d = {"out_dir": str(out_dir), "model": dict(TINY_MODEL), "tokenizer": str(tokenizer_dir),
         "data": [{"kind": "text", "paths": [str(corpus)]}], "seq_len": 32, "micro_batch_size": 2,
         "grad_accum": 2, "steps": 6, "lr": 1e-2, "warmup_steps": 2, "progress": False, "seed": 0,
         "threads": 1}
    d.update(kw)
    return d
