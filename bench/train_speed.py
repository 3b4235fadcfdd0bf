"""Training throughput of the `nano` config on this machine, side by side with transformers' Qwen3-MoE.

    .venv/bin/python bench/train_speed.py [--batch 8 --seq 256 --steps 6 --threads N]

Rows: omnimini nano (MoE, text only), transformers Qwen3MoeForCausalLM with the same shape (experts, top-k,
widths, first dense layer, tied embeddings, per-head QK norm, aux loss on), and omnimini dense with the same
*active* parameters (the "MoE tax": MoE tok/s / dense tok/s). Each step is forward + backward + AdamW; the
models are timed in interleaved rounds so a noisy neighbour slows all of them alike. MFU is against a
measured fp32 matmul peak of this CPU (or the GPU's bf16 peak).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from omnimini.config import param_counts, preset
from omnimini.model.model import OmniModel
from omnimini.train.flops import flops_per_token, peak_flops


def nano_text():
    cfg = preset("nano")
    cfg.vision = None
    return cfg


def dense_same_active(cfg):
    d = copy.deepcopy(cfg)
    # a dense SwiGLU as wide as the top-k experts together: the same active parameters (minus the router)
    width = cfg.moe.top_k * cfg.moe.expert_intermediate
    d.moe = None
    d.intermediate_size = width
    return d, cfg.intermediate_size  # (the first_k_dense layers keep their own width below)


def omni_dense(cfg):
    d, first_width = dense_same_active(cfg)
    model = OmniModel(d)
    from omnimini.model.layers import SwiGLU

    for i in range(cfg.moe.first_k_dense):  # keep the MoE model's first dense layer(s) as they are
        model.blocks[i].mlp = SwiGLU(d.hidden_size, first_width)
    return model


def qwen3_moe(cfg):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = cfg.moe
    hf = Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_head,
        intermediate_size=cfg.intermediate_size, moe_intermediate_size=m.expert_intermediate,
        num_experts=m.num_experts, num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=list(range(m.first_k_dense)), max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        output_router_logits=True, router_aux_loss_coef=m.aux_loss_coef, attention_dropout=0.0,
    )
    hf._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(hf)


def make_step(model, ids, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (each model runs once per round)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time omnimini nano under torch.compile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = nano_text()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    models = {"omnimini nano (MoE 8x, top-2)": (OmniModel(cfg), False),
              "transformers Qwen3-MoE, same shape": (qwen3_moe(cfg), True),
              "omnimini dense, same active params": (omni_dense(cfg), False)}
    if args.compile:
        m = OmniModel(cfg)
        m.load_state_dict(models["omnimini nano (MoE 8x, top-2)"][0].state_dict())
        models["omnimini nano, torch.compile"] = (m, False)
    steps = {k: make_step(torch.compile(m) if "compile" in k else m, ids, hf) for k, (m, hf) in models.items()}
    for s in steps.values():  # warm-up (allocations, first-call overheads)
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    peak = peak_flops(torch.device("cpu"))
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    pc = param_counts(cfg)
    print(f"nano text model: {pc['total_params']:,} params, {pc['active_params']:,} active; batch {args.batch} x "
          f"{args.seq}; torch threads {torch.get_num_threads()}; measured matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| model | params | step (median s) | tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    tps = {}
    for k, (m, _) in models.items():
        med = statistics.median(times[k])
        tps[k] = tokens / med
        n = sum(p.numel() for p in m.parameters())
        print(f"| {k} | {n:,} | {med:.3f} | {tps[k]:,.0f} | {100 * tps[k] * fpt / peak:.1f}% |")
    names = list(models)
    print(f"\nomnimini / transformers tokens/s: {tps[names[0]] / tps[names[1]]:.2f}x (target >= 1.5x)")
    print(f"MoE tax (MoE / dense same-active tokens/s): {tps[names[0]] / tps[names[2]]:.2f}x (target >= 0.7x)")


if __name__ == "__main__":
    main()
