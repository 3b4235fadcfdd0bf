"""Recipe stage `vision_warmup`: the vision encoder + projector of a checkpoint trained alone on dense scene facts.

Why a stage of its own: a tower trained jointly with the LM (nano's pre-training and SFT) never becomes
informative, and the LM answers from question priors (blank-image controls score the same: recipes/README.md).
Linear heads on each image token (vl/targets.py: colour / shape / size of the object covering the cell, where its
centre lies, receptacle, wall, the image's object count) make every token carry its cell; the stages after it
freeze the tower (`vision_lr_mult: 0`) so the LM learns to read it instead of erasing it. The same warm-up as
omnimini-vl's (vl/train.py), for any checkpoint with a vision encoder.

Writes OUT/checkpoint (model + tokenizer, the LM untouched) for `init_from`; resumes from OUT/warmup.pt.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omnimini.config import ConfigError


@dataclass
class VisionWarmupConfig:
    init_from: str
    steps: int = 1200
    batch: int = 64
    lr: float = 2e-3
    warmup_steps: int = 40
    threads: int = 1
    seed: int = 0
    save_every: int = 100
    # start the tower (not the projector's norm scale) from a fresh init: a tower trained jointly with the LM in
    # pre-training learned colour slower than a fresh one (nano, 200 steps of 32: cell colour 0.13 vs 0.31)
    fresh_tower: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> VisionWarmupConfig:
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"vision_warmup stage: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
        if not d.get("init_from"):
            raise ConfigError("vision_warmup stage: needs init_from (a checkpoint or an earlier stage's name)")
        cfg = cls(**d)
        for k in ("steps", "batch", "threads"):
            if getattr(cfg, k) < 1:
                raise ConfigError(f"vision_warmup stage: {k} must be >= 1, got {getattr(cfg, k)}")
        return cfg


def run_vision_warmup(cfg: VisionWarmupConfig, out: Path) -> dict:
    from tqdm import tqdm

    from omnimini.model.model import OmniModel
    from omnimini.tokenizer import Tokenizer
    from omnimini.train.optim import lr_factor
    from omnimini.vl.targets import DenseHeads
    from omnimini.vl.train import StageConfig, _save, warmup_batch, word_embeddings

    done = out / "report.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        if rep.get("steps") == cfg.steps:
            return rep
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = OmniModel.from_pretrained(cfg.init_from), Tokenizer.from_dir(cfg.init_from)
    if model.vision is None:
        raise ConfigError(f"vision_warmup stage: {cfg.init_from} has no vision encoder")
    vcfg = model.config.vision
    if cfg.fresh_tower:
        torch.manual_seed(cfg.seed)
        model.vision.apply(OmniModel._init)
        if model.vision.proj_norm is not None:
            torch.nn.init.constant_(model.vision.proj_norm.weight, vcfg.token_scale)
    heads = DenseHeads(model.config.hidden_size, vcfg.tokens_per_image, word_embeddings(model, tok), token_norm=True)
    params = list(model.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    out.mkdir(parents=True, exist_ok=True)
    ckpt, start = out / "warmup.pt", 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.vision.load_state_dict(st["vision"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"vision_warmup: resuming at step {start}", file=sys.stderr)
    batch_cfg = StageConfig(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr)
    model.vision.train()
    metrics: dict = {}
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vision_warmup", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, min_ratio=0.1)
        pixels, targets = warmup_batch(step, batch_cfg, vcfg)
        loss, acc = heads(model.encode_images(pixels), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        metrics = {"loss": round(loss.item(), 4), **{k: round(v, 3) for k, v in acc.items()}}
        bar.set_postfix({k: metrics[k] for k in ("loss", "colour_obj", "shape", "count") if k in metrics})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(ckpt, {"vision": model.vision.state_dict(), "heads": heads.state_dict(),
                         "opt": opt.state_dict(), "step": step + 1})
    model.vision.eval()
    final = out / "checkpoint"
    model.save_pretrained(final, tokenizer=tok)
    report = {"steps": cfg.steps, "checkpoint": str(final), "final": metrics,
              "wall_s_this_run": round(time.time() - t0, 1)}
    done.write_text(json.dumps(report, indent=2) + "\n")
    print(f"vision_warmup: {cfg.steps} steps, last batch {metrics}; wrote {final}", file=sys.stderr)
    return report
