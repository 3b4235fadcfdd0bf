"""GPU smoke benchmark: bf16 training throughput/MFU and KV-cache decode speed of OmniModel on one CUDA device.

    python bench/gpu_check.py [--preset small] [--steps 30] [--seq 1024] [--batch 8]

Not a test (CI has no GPU): prints a short report; run it on a GPU machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from omnimini.config import param_counts, preset
from omnimini.engine.generate import GenRequest, generate
from omnimini.engine.sampling import SamplingParams
from omnimini.model import OmniModel


def train_speed(name: str, steps: int, seq: int, batch: int, dev: torch.device) -> dict:
    cfg = preset(name)
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    torch.manual_seed(0)
    model = OmniModel(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded from timing
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.lm_loss.detach()))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = steps * batch * seq / dt
    active = param_counts(cfg)["active_params"]
    flops_per_tok = 6 * active + 12 * cfg.num_layers * cfg.hidden_size * seq  # params + attention
    peak = 989e12 if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name() else 312e12
    return {"preset": name, "tokens_per_s": tok_s, "mfu": tok_s * flops_per_tok / peak,
            "loss_first": losses[0], "loss_last": losses[-1], "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


@torch.inference_mode()
def decode_speed(name: str, dev: torch.device, batch: int, new: int = 128) -> float:
    cfg = preset(name)
    model = OmniModel(cfg).to(dev, torch.bfloat16).eval()
    p = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    reqs = [GenRequest(list(range(1, 65)), p) for _ in range(batch)]
    generate(model, reqs[:1], eos_ids=[0])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, reqs, eos_ids=[0])
    torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    r = train_speed(a.preset, a.steps, a.seq, a.batch, dev)
    print(f"train  {r['preset']}: {r['tokens_per_s']:,.0f} tok/s  MFU {100 * r['mfu']:.1f}%  "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  peak mem {r['peak_mem_gb']:.1f} GB")
    for b in (1, 16):
        print(f"decode {a.preset} bf16 batch {b:>2}: {decode_speed(a.preset, dev, b):,.0f} tok/s")


if __name__ == "__main__":
    main()
