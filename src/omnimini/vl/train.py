"""Train omnimini-vl's vision encoder + projector, LLaVA-style, with the text model frozen.

Stage `warmup`: the encoder + projector alone, with linear heads on each of the 16 image tokens, learn what every
cell of generated images shows (dense targets read off the generators: `vl/targets.py`). Measured on the nano
model: a tower trained jointly with the LM from scratch never becomes informative, while a pre-trained one is
read by the LM within minutes (`recipes/README.md`).
Stage `align`: image-grounded chat (scene and plain-shape captions, short questions, scene QA and pointing in the
evaluator's own prompt format) through the frozen LM; the vision weights and the image adapters (every position
from the image on) learn, and the dense heads keep training beside the LM loss, so the encoder cannot forget what a
cell shows while the projector and adapters learn to make the LM read it. A grounding probe (held-out answer NLL
with real / blank / mismatched images) is logged every PROBE_EVERY steps.

Every sample is a pure function of (stage, step, index), so a resumed run continues exactly; checkpoints are
written to a temporary file and renamed. `python -m omnimini.vl.train --out runs/omnimini-vl` runs both stages and
writes the shipped vision file; re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omnimini.data.scene_samples import image_sample, make_family, scene_caption
from omnimini.data.scenes.shapes import Shape, ShapesFamily, describe_shapes, generate_shapes, render_shapes
from omnimini.data.scenes.tasks import TRAIN_SEEDS
from omnimini.data.scenes.world import generate_scene, render
from omnimini.images import to_pixels
from omnimini.train.optim import lr_factor
from omnimini.vl import spec
from omnimini.vl.targets import WORDS, DenseHeads, dense_targets, scene_objects, shapes_objects


@dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 20
    aux_weight: float = 1.0  # weight of the dense-head loss (the whole loss in the warm-up)
    lm_weight: float = 0.0
    save_every: int = 25
    train_tower: bool = True  # False: the encoder + projector stay as they are, only the adapters learn


WARMUP = StageConfig(steps=800, batch=48, lr=2e-3, warmup=40, save_every=100)
# Stage 2: image-grounded chat through the frozen LM, training the vision weights and the image adapters
# (model.ImageAdapter, every position from the image on). The earlier run's adapter stage never stepped the
# adapters (they were left out of the optimizer): that, not the adapters, is why it read nothing.
# The shipped file: a 700-step run, resumed with --align-steps 1000 (the cosine schedule stretched from there) and
# stopped at step 950 (the probe's real-vs-mismatched gap was still widening).
ALIGN = StageConfig(steps=1000, batch=8, lr=1e-3, warmup=20, aux_weight=0.5, lm_weight=1.0, save_every=10)
STAGES = ("warmup", "align")
PROBE_EVERY = 25  # steps between grounding probes (answer NLL with the real vs a blank image, held-out samples)
# image-grounded chat sources of the align stage and their weights (one source per step: similar lengths, little
# padding). Planning and navigation are left out: their 250-token prompts would cost ~5x a step each (see README).
MIX = {"shapes_qa": 6, "shapes_caption": 2, "scene_caption": 1, "scene_qa": 4, "pointing": 2}
# further sources, for --mix only (the shipped file's rebuild keeps MIX): scene_qa_multi is one scene with 8
# questions as a multi-turn chat (the image and intro paid once per 8 questions)
EXTRA_SOURCES = ("scene_qa_multi",)


def _seed(*key) -> int:
    return TRAIN_SEEDS[random.Random("/".join(map(str, key))).randrange(len(TRAIN_SEEDS))]


def dense_image(kind: str, seed: int, size: int, grid: int):
    """(image, dense targets) of a generated scene or plain-shapes image."""
    rng = random.Random(f"vl-dense/{kind}/{seed}")
    if kind == "scene":
        scene = generate_scene(rng)
        return render(scene, size), dense_targets(scene_objects(scene), grid, scene)
    bg, shapes = generate_shapes(rng)
    return render_shapes(bg, shapes, size), dense_targets(shapes_objects(shapes), grid)


def stack_targets(ts: list[dict]) -> dict:
    return {k: torch.stack([t[k] for t in ts]) for k in ts[0]}


def warmup_batch(step: int, cfg: StageConfig, vcfg) -> tuple[torch.Tensor, dict]:
    grid = vcfg.grid // vcfg.pixel_shuffle
    items = [dense_image("scene" if i % 2 == 0 else "shapes", _seed("warmup", step, i), vcfg.image_size, grid)
             for i in range(cfg.batch)]
    pixels = torch.stack([to_pixels(img, vcfg.image_size) for img, _ in items])
    return pixels, stack_targets([t for _, t in items])


class AlignData:
    """Chat samples with one image each, plus the image's dense targets where its generator gives them."""

    def __init__(self, tok, vcfg, seq_len: int = 512, mix: dict[str, float] | None = None):
        self.tok, self.vcfg, self.seq_len = tok, vcfg, seq_len
        self.shapes = ShapesFamily(image_size=vcfg.image_size)
        self.qa = make_family("qa", vcfg.image_size)
        self.pointing = make_family("pointing", vcfg.image_size)
        names, weights = zip(*(mix or MIX).items(), strict=True)
        self.names, self.weights = list(names), list(weights)

    def source(self, step: int) -> str:
        return random.Random(f"vl-align/source/{step}").choices(self.names, self.weights)[0]

    def _messages(self, src: str, seed: int):
        """(image, [(user text, answer)] turns, dense targets or None) of one sample of `src`."""
        grid = self.vcfg.grid // self.vcfg.pixel_shuffle
        size = self.vcfg.image_size
        if src == "shapes_qa":
            ep = self.shapes.episode(seed)
            objs = shapes_objects([Shape(**s) for s in ep.meta["shapes"]])
            return ep.image, [(ep.prompt, ep.answer)], dense_targets(objs, grid)
        if src == "shapes_caption":
            bg, shapes = generate_shapes(random.Random(f"vl-caption/{seed}"))
            return (render_shapes(bg, shapes, size), [("Describe the image.", describe_shapes(shapes))],
                    dense_targets(shapes_objects(shapes), grid))
        if src == "scene_caption":
            scene = generate_scene(random.Random(f"caption/{seed}"))
            return (render(scene, size), [("Describe the image.", scene_caption(scene))],
                    dense_targets(scene_objects(scene), grid, scene))
        if src == "scene_qa_multi":
            return (*self.qa.conversation(seed), None)
        fam = self.qa if src == "scene_qa" else self.pointing
        ep = fam.episode(seed)
        return ep.image, [(ep.prompt, ep.answer)], None

    def batch(self, step: int, n: int) -> dict:
        src = self.source(step)
        return self.batch_of(src, ("align", src, step), n)

    def batch_of(self, src: str, key: tuple, n: int) -> dict:
        samples, dense = [], []
        i = 0
        while len(samples) < n:
            image, turns, targets = self._messages(src, _seed(*key, i))
            i += 1
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]}]
            for j, (q, a) in enumerate(turns):
                if j:
                    msgs.append({"role": "user", "content": q})
                msgs.append({"role": "assistant", "content": a})
            s = image_sample(self.tok, msgs, image, self.vcfg.image_size, self.vcfg.tokens_per_image, self.seq_len)
            if s is not None:
                samples.append(s)
                dense.append(targets)
        T = max(len(s["input_ids"]) for s in samples)
        pad = self.tok.pad_token_id
        # right padding needs no attention mask: a causal query never sees the pads after it
        ids = torch.tensor([s["input_ids"] + [pad] * (T - len(s["input_ids"])) for s in samples])
        labels = torch.tensor([s["labels"] + [-100] * (T - len(s["labels"])) for s in samples])
        out = {"source": src, "input_ids": ids, "labels": labels,
               "pixels": torch.cat([s["pixels"] for s in samples])}
        if all(d is not None for d in dense):
            out["dense"] = stack_targets(dense)
        return out


class PrefixKV:
    """Keys/values of the prompt prefix every sample shares (system turn + "<|im_start|>user\n": 24 of SmolLM2's
    ~60 tokens of a short sample). The LM is frozen and the prefix comes before the image, so its keys and values
    never change: computed once, copied into each batch's cache, and the LM runs (and back-propagates) only the
    rest. Exactly the full forward's result (test)."""

    def __init__(self, model):
        self.model, self.known = model, {}

    def cache_for(self, prefix: tuple, rows: int, length: int):
        if prefix not in self.known:
            one = self.model.new_cache(1, len(prefix))
            with torch.no_grad():
                self.model(torch.tensor([prefix]), cache=one)
            self.known[prefix] = one
        src = self.known[prefix]
        cache = self.model.new_cache(rows, length)
        for dst_k, dst_v, k, v in zip(cache.k, cache.v, src.k, src.v, strict=True):
            dst_k[:, :, : len(prefix)] = k[:, :, : len(prefix)]
            dst_v[:, :, : len(prefix)] = v[:, :, : len(prefix)]
        return cache


def shared_prefix(ids: torch.Tensor, stop: int) -> int:
    """Length of the prefix all rows share, ending before the first `stop` token (the image)."""
    same = (ids == ids[:1]).all(0)
    n = int(same.long().cumprod(0).sum())
    first_image = (ids[0] == stop).nonzero()
    return min(n, int(first_image[0]) if len(first_image) else n)


def lm_loss_per_sample(model, batch: dict, prefix_kv: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer-token NLL of each sample averaged over samples, the image tokens): a one-word answer weighs as
    much as a caption. Logits are computed at answer positions only (the vocabulary head is a quarter of the
    LM's cost)."""
    labels, ids = batch["labels"], batch["input_ids"]
    where = labels != -100
    image_embeds = model.encode_images(batch["pixels"])
    P = shared_prefix(ids, model.config.image_token_id) if prefix_kv is not None else 0
    if P:
        B, T = ids.shape
        cache = prefix_kv.cache_for(tuple(ids[0, :P].tolist()), B, T)
        out = model(ids[:, P:], positions=torch.arange(P, T).expand(B, -1), cache=cache,
                    image_embeds=image_embeds, logits_for=where[:, P:])
        where = where.clone()
        where[:, :P] = False
    else:
        out = model(ids, image_embeds=image_embeds, logits_for=where)
    nll = F.cross_entropy(out.logits.float(), labels[where], reduction="none")
    row = where.nonzero()[:, 0]
    per = torch.zeros(labels.shape[0]).index_add_(0, row, nll) / where.sum(1).clamp(min=1)
    return per.mean(), image_embeds


# ---------------------------------------------------------------- the loop


def vl_parameters(model, tower: bool = True) -> list:
    """What omnimini-vl trains: the vision encoder + projector (unless tower=False: a read-out-only run) and the
    image adapters (the LM stays frozen)."""
    adapters = [p for blk in model.blocks for p in blk.image_adapter.parameters()]
    return (list(model.vision.parameters()) if tower else []) + adapters


def vl_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if spec.is_vl_tensor(k)}


def probe_batches(data: AlignData, n: int = 8) -> list[dict]:
    """Fixed held-out batches (seeds drawn under their own key) of short image questions and scene QA."""
    return [data.batch_of(src, ("probe", src), n) for src in ("shapes_qa", "scene_qa")]


@torch.no_grad()
def grounding_probe(model, batches: list[dict]) -> dict:
    """Answer NLL with the real images, a blank (grey) image and the batch's images rolled by one: the gap between
    real and the controls is what the LM reads from the image (no gap: it sees nothing)."""
    out = {}
    for b in batches:
        src = b["source"]
        for name, px in (("real", b["pixels"]), ("blank", torch.zeros_like(b["pixels"])),
                         ("mismatched", b["pixels"].roll(1, 0))):
            out[f"{src}_{name}"] = round(lm_loss_per_sample(model, {**b, "pixels": px})[0].item(), 4)
    return out


def _lr(step: int, cfg: StageConfig) -> float:
    return cfg.lr * lr_factor(step, cfg.warmup, cfg.steps, min_ratio=0.1)  # the trainer's warmup + cosine


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_stage(name: str, cfg: StageConfig, model, heads: DenseHeads, out: Path, data: AlignData | None,
              log) -> dict:
    """Train the vision weights (+ heads; the adapters too when `data` is given) for one stage, resuming from
    out/<name>.pt; returns the last metrics."""
    prefix_kv = PrefixKV(model)
    ckpt = out / f"{name}.pt"
    # the warm-up has no LM in its loss: the adapters would only decay there
    params = (vl_parameters(model, cfg.train_tower) if data is not None else list(model.vision.parameters())) \
        + list(heads.parameters())
    model.vision.requires_grad_(cfg.train_tower or data is None)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["vl"], strict=False)
        heads.load_state_dict(st["heads"], strict=False)  # a head added since is trained from its init
        opt.load_state_dict(st["opt"])
        start = st["step"]
        if start >= cfg.steps:
            return st.get("metrics", {})
        print(f"omnimini-vl: resuming {name} at step {start}", file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"omnimini-vl {name}",
               unit="step", file=sys.stderr, dynamic_ncols=True)
    model.vision.train()
    metrics: dict = {}
    probes = probe_batches(data) if data is not None else None
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        if data is None:
            pixels, targets = warmup_batch(step, cfg, model.config.vision)
            loss, acc = heads(model.encode_images(pixels), targets)
            metrics = {"loss": loss.item(), **acc}
        else:
            batch = data.batch(step, cfg.batch)
            lm, tokens = lm_loss_per_sample(model, batch, prefix_kv)
            loss = cfg.lm_weight * lm
            metrics = {"lm_loss": lm.item(), "source": batch["source"]}
            if "dense" in batch and cfg.aux_weight > 0:
                aux, acc = heads(tokens, batch["dense"])
                loss = loss + cfg.aux_weight * aux
                metrics.update(aux_loss=aux.item(), colour_obj=acc["colour_obj"], word=acc.get("word"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        opt.step()
        metrics.update(step=step + 1, grad_norm=gn, lr=_lr(step, cfg), elapsed=time.time() - t0)
        if probes is not None and ((step + 1) % PROBE_EVERY == 0 or step + 1 == cfg.steps):
            metrics["probe"] = grounding_probe(model, probes)
            print(f"omnimini-vl {name} step {step + 1} probe NLL {metrics['probe']}", file=sys.stderr)
        log.write(json.dumps({"stage": name, **metrics}) + "\n")
        log.flush()
        bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()
                         if k in ("loss", "lm_loss", "colour_obj", "word", "count", "source")})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(ckpt, {"vl": vl_state(model), "heads": heads.state_dict(),
                         "opt": opt.state_dict(), "step": step + 1, "metrics": metrics})
    model.vision.eval()
    return metrics


def fresh_vl_model():
    """(omnimini-vl with freshly initialised vision weights, its tokenizer), from the text model alone."""
    from omnimini.weights.convert import load_any
    from omnimini.weights.default import TEXT_MODEL_NAME

    text_model, text_tok = load_any(TEXT_MODEL_NAME)  # the LM alone, whatever vision file is shipped
    tok = spec.vl_tokenizer(text_tok)
    return spec.attach_vision(text_model, tok), tok


def word_embeddings(model, tok) -> torch.Tensor:
    """The LM's input embedding of each of WORDS (as it follows a space: the form used mid-sentence)."""
    ids = [tok.encode(" " + w)[0] for w in WORDS]
    return model.embed.weight[torch.tensor(ids)].detach().clone()


def build(out: Path, warmup: StageConfig = WARMUP, align: StageConfig = ALIGN, threads: int = 2,
          vision_file: Path | None = None, init_from: Path | None = None, mix: dict[str, float] | None = None,
          ) -> dict:
    """Both stages from the default text model; writes out/omnimini-vl-vision.safetensors (and vision_file).
    With `init_from` (a vision file, e.g. the shipped one) the vision weights and adapters start from it and the
    warm-up is skipped: a further align run on a finished model whose checkpoints are gone (the dense heads,
    not in the file, restart from their init)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = fresh_vl_model()
    if init_from is not None and not (out / "align.pt").exists():
        model.load_state_dict(spec.read_vision_file(init_from), strict=False)
        print(f"omnimini-vl: vision weights from {init_from}; warm-up skipped", file=sys.stderr)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in vl_parameters(model):
        p.requires_grad_(True)
    heads = DenseHeads(model.config.hidden_size, model.config.vision.tokens_per_image, word_embeddings(model, tok))
    report = {"warmup": asdict(warmup), "align": asdict(align), "mix": mix or MIX}
    t0 = time.time()
    with (out / "log.jsonl").open("a") as log:
        if init_from is None:
            report["warmup_metrics"] = run_stage("warmup", warmup, model, heads, out, None, log)
        data = AlignData(tok, model.config.vision, mix=mix)
        report["align_metrics"] = run_stage("align", align, model, heads, out, data, log)
    report["wall_s_this_run"] = round(time.time() - t0, 1)
    target = out / spec.VISION_FILE.name
    spec.write_vision_file(model, target)
    if vision_file is not None:
        spec.write_vision_file(model, vision_file)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"omnimini-vl: wrote {target} ({target.stat().st_size / 1e6:.1f} MB); report {out / 'report.json'}",
          file=sys.stderr)
    return report


def export(out: Path, target: Path) -> Path:
    """Write the vision file from the newest stage checkpoint in `out` (align, else warmup), e.g. mid-run."""
    ckpt = next((out / f"{s}.pt" for s in reversed(STAGES) if (out / f"{s}.pt").exists()), None)
    if ckpt is None:
        raise FileNotFoundError(f"{out}: no stage checkpoint ({', '.join(STAGES)}) to export")
    model, _ = fresh_vl_model()
    st = torch.load(ckpt, weights_only=False)
    model.load_state_dict(st["vl"], strict=False)
    spec.write_vision_file(model, target)
    print(f"omnimini-vl: exported {ckpt.name} step {st['step']} to {target}", file=sys.stderr)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnimini.vl.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/omnimini-vl", help="run directory (resumes when it holds checkpoints)")
    ap.add_argument("--warmup-steps", type=int, default=WARMUP.steps)
    ap.add_argument("--align-steps", type=int, default=ALIGN.steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--install", action="store_true",
                    help=f"also write the result to the package's shipped file ({spec.VISION_FILE})")
    ap.add_argument("--init-from", metavar="FILE", default=None,
                    help="start the align stage from this vision file (skips the warm-up), e.g. the shipped one")
    ap.add_argument("--align-lr", type=float, default=ALIGN.lr)
    ap.add_argument("--aux-weight", type=float, default=ALIGN.aux_weight,
                    help="weight of the dense heads' loss in the align stage (0 with --init-from: the heads are not "
                         "in the vision file and would restart from noise, pulling the encoder with them)")
    ap.add_argument("--mix", default=None, metavar="SRC=W,...",
                    help=f"align sources and weights (default {','.join(f'{k}={v}' for k, v in MIX.items())})")
    ap.add_argument("--freeze-tower", action="store_true",
                    help="align stage: train the image adapters only (encoder + projector as loaded: a read-out run)")
    ap.add_argument("--export", metavar="FILE", default=None,
                    help="only write FILE from the run's newest checkpoint (no training)")
    a = ap.parse_args(argv)
    if a.export:
        export(Path(a.out), Path(a.export))
        return 0
    for flag, v in (("--warmup-steps", a.warmup_steps), ("--align-steps", a.align_steps),
                    ("--threads", a.threads)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    w = StageConfig(**{**asdict(WARMUP), "steps": a.warmup_steps, "warmup": min(WARMUP.warmup, a.warmup_steps)})
    if a.align_lr <= 0:
        ap.error(f"--align-lr must be > 0, got {a.align_lr}")
    init = Path(a.init_from) if a.init_from else None
    if init is not None and not init.is_file():
        ap.error(f"--init-from {init}: no such file")
    if a.aux_weight < 0:
        ap.error(f"--aux-weight must be >= 0, got {a.aux_weight}")
    al = StageConfig(**{**asdict(ALIGN), "steps": a.align_steps, "warmup": min(ALIGN.warmup, a.align_steps),
                        "lr": a.align_lr, "aux_weight": a.aux_weight, "train_tower": not a.freeze_tower})
    mix = None
    if a.mix:
        try:
            mix = {k.strip(): float(v) for k, v in (part.split("=") for part in a.mix.split(","))}
        except ValueError:
            ap.error(f"--mix must look like scene_qa=4,shapes_qa=2, got {a.mix!r}")
        bad = [k for k in mix if k not in MIX and k not in EXTRA_SOURCES]
        if bad or not all(v >= 0 for v in mix.values()) or not sum(mix.values()):
            ap.error(f"--mix: sources are {', '.join((*MIX, *EXTRA_SOURCES))} with weights >= 0, not all 0 "
                     f"(got {a.mix!r})")
    build(Path(a.out), w, al, a.threads, spec.VISION_FILE if a.install else None, init, mix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
