"""Do a vision file's image tokens hold what scene questions ask? A question-conditioned probe, no LM.

The served VLMs answer held-out scene QA at their blank-image score. That is either the encoder (the 16 tokens
do not hold relations, containers, per-object attributes) or the read-out (a frozen LM + adapters that never
learned to extract them). This separates the two: a small transformer (2 layers, width 128) reads the frozen
image tokens together with the question's token embeddings (the LM's own table) and classifies the answer.
Trained once on the real tokens and once on a blank image's tokens (the same for every item: what the question
alone predicts), scored per question type on held-out seeds. Real well above blank: the tokens hold the answer
and the read-out is what fails; real = blank: the encoder must change.

    python -m omnimini.vl.qa_probe [--vision FILE] [--train 12000] [--test 2000] [--epochs 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from omnimini.data.scenes.qa import QAFamily
from omnimini.images import to_pixels
from omnimini.vl import spec

TEST_SEED0 = 10_000_000  # held-out seeds start here (training data uses 0..N)


def episodes(seeds, size: int):
    fam = QAFamily(image_size=size, fmt="short", balanced=True)
    for s in seeds:
        ep = fam.episode(s)
        question = ep.prompt.split("\n\n")[1]  # intro, question, instruction
        yield ep.image, question, ep.meta["answer_text"], ep.meta["qtype"]


@torch.no_grad()
def featurise(model, tok, seeds, size: int, desc: str) -> dict:
    """Image tokens [N, T, H], question embeddings [N, L, H] (padded) + mask, answers, question types."""
    imgs, qs, answers, types = [], [], [], []
    batch = []

    def flush():
        imgs.append(model.vision(torch.stack(batch)).float())
        batch.clear()

    for img, q, a, t in tqdm(episodes(seeds, size), total=len(seeds), desc=desc, unit="item"):
        batch.append(to_pixels(img, size))
        qs.append(tok.encode(q))
        answers.append(a)
        types.append(t)
        if len(batch) == 64:
            flush()
    if batch:
        flush()
    L = max(len(q) for q in qs)
    ids = torch.zeros(len(qs), L, dtype=torch.long)
    mask = torch.zeros(len(qs), L, dtype=torch.bool)
    for i, q in enumerate(qs):
        ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), True
    return {"image": torch.cat(imgs), "question": model.embed(ids).float(), "mask": mask, "answers": answers,
            "types": types}


class Probe(nn.Module):
    def __init__(self, hidden: int, n_image: int, n_classes: int, width: int = 128):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(hidden, width), nn.Linear(hidden, width)
        self.img_pos = nn.Parameter(torch.randn(n_image, width) * 0.02)  # which cell a token is
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(width, n_classes)

    def forward(self, image, question, mask):
        B = image.shape[0]
        x = torch.cat([self.cls.expand(B, 1, -1), self.img_in(image) + self.img_pos, self.txt_in(question)], 1)
        keep = torch.cat([torch.ones(B, 1 + image.shape[1], dtype=torch.bool), mask], 1)
        return self.out(self.body(x, src_key_padding_mask=~keep)[:, 0])


def train_probe(train: dict, test: dict, classes: list[str], image_key: str, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[a] for a in train["answers"]])
    probe = Probe(train["question"].shape[-1], train[image_key].shape[1], len(classes))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    n, bs = len(y), 128
    steps = epochs * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=f"probe on {image_key} tokens", unit="step")
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, bs):
            j = order[i:i + bs]
            loss = F.cross_entropy(probe(train[image_key][j], train["question"][j], train["mask"][j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    probe.eval()
    with torch.no_grad():
        pred = probe(test[image_key], test["question"], test["mask"]).argmax(-1)
    return by_type([classes[p] == a for p, a in zip(pred.tolist(), test["answers"], strict=True)], test["types"])


def by_type(right: list, types: list[str]) -> dict:
    """{question type (and "all"): (accuracy, n)}."""
    groups = defaultdict(list)
    for ok, t in zip(right, types, strict=True):
        groups[t].append(ok)
        groups["all"].append(ok)
    return {t: (sum(v) / len(v), len(v)) for t, v in groups.items()}


def print_table(title: str, a: dict, b: dict, a_name: str, b_name: str) -> None:
    """Per question type: n, accuracy under a, under b, and the gap, "all" first."""
    print(f"\n{title}")
    print(f"{'question type':<16}{'n':>6}{a_name:>10}{b_name:>10}{'gap':>8}")
    for t in sorted(a, key=lambda k: (k != "all", k)):
        (x, n), (y, _) = a[t], b[t]
        print(f"{t:<16}{n:>6}{x:>10.3f}{y:>10.3f}{x - y:>+8.3f}")


def caption_ceiling(n: int, threads: int) -> dict:
    """What the frozen text LM answers when the image is replaced by a perfect description of it (the scene
    caption the align stage trains on), against the question alone: the ceiling of a read-out that turns the image
    into text-like tokens and leaves the reasoning to the LM unchanged. Evaluator prompts (mixed formats)."""
    from omnimini.data.scene_samples import scene_caption
    from omnimini.data.scenes.world import Scene
    from omnimini.eval.local import LocalRunner
    from omnimini.runtime import load_for_inference
    from omnimini.weights.default import TEXT_MODEL_NAME

    torch.set_num_threads(threads)
    model, tok = load_for_inference(TEXT_MODEL_NAME, quantize="auto")
    runner = LocalRunner(model, tok, batch_size=16)
    fam = QAFamily(image_size=128)
    eps = [fam.episode(s) for s in range(TEST_SEED0, TEST_SEED0 + n)]
    out: dict = {}
    for name in ("caption", "question only"):
        prompts = []
        for ep in eps:
            text = ep.prompt
            if name == "caption":
                text = ("Here is a description of the image instead of the image itself: "
                        f"{scene_caption(Scene.from_dict(ep.meta['scene']))}\n\n{text}")
            prompts.append([{"role": "user", "content": text}])
        answers = []
        for i in tqdm(range(0, n, 16), desc=f"text LM, {name}", unit="batch"):
            answers += runner.generate(prompts[i:i + 16], {"temperature": 0, "max_tokens": 12})
        out[name] = by_type([fam.score(ep, a)["score"] for ep, a in zip(eps, answers, strict=True)],
                            [ep.meta["qtype"] for ep in eps])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", default=str(spec.VISION_FILE), help="omnimini-vl vision file (default: shipped)")
    ap.add_argument("--train", type=int, default=12000, help="training items (seeds 0..N-1)")
    ap.add_argument("--test", type=int, default=2000, help="held-out items")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--caption-ceiling", type=int, default=0, metavar="N",
                    help="instead: score the text LM on N held-out questions with the scene caption in place of the "
                         "image, and with the question alone")
    args = ap.parse_args(argv)
    for name in ("train", "test", "epochs", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.caption_ceiling < 0:
        ap.error("--caption-ceiling must be at least 1 (or 0: the probe)")
    if args.caption_ceiling:
        res = caption_ceiling(args.caption_ceiling, args.threads)
        print_table(f"text LM on {args.caption_ceiling} held-out scene questions (evaluator prompts)",
                    res["caption"], res["question only"], "caption", "no image")
        return 0
    if not Path(args.vision).is_file():
        ap.error(f"--vision: no such file: {args.vision}")
    torch.set_num_threads(args.threads)
    from omnimini.vl.train import fresh_vl_model

    t0 = time.perf_counter()
    model, tok = fresh_vl_model()
    model.load_state_dict(spec.read_vision_file(Path(args.vision)), strict=False)
    model.eval()
    size = model.config.vision.image_size
    train = featurise(model, tok, range(args.train), size, "train items")
    test = featurise(model, tok, range(TEST_SEED0, TEST_SEED0 + args.test), size, "held-out items")
    with torch.no_grad():
        blank = model.vision(to_pixels(Image.new("RGB", (size, size), (242, 238, 228)), size)[None]).float()
    for d in (train, test):
        d["blank"] = blank.expand_as(d["image"])
    classes = sorted(set(train["answers"]) | set(test["answers"]))
    real = train_probe(train, test, classes, "image", args.epochs)
    prior = train_probe(train, test, classes, "blank", args.epochs)
    print_table(f"question-conditioned probe on {Path(args.vision).name}'s image tokens ({args.train} train / "
                f"{args.test} held-out items, {len(classes)} answers, {time.perf_counter() - t0:.0f} s)",
                real, prior, "real", "blank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
