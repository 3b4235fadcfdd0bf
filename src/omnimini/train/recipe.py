"""Recipes: a sequence of stages (tokenizer -> pre-training -> instruction tuning -> scene evaluation) in one file.

A recipe file has `stages:` (a list); a file without it is a single training stage. Each stage writes into
OUT/<stage name>; a stage whose results already exist is skipped and an interrupted training stage resumes
from its newest checkpoint, so re-running the same command finishes an interrupted recipe.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import yaml

from omnimini.config import ConfigError
from omnimini.data.text import data_root
from omnimini.train.config import TrainConfig, read_config_file

REPO_RECIPES = Path(__file__).resolve().parents[3] / "recipes"
SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def find_recipe(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for root in (Path.cwd() / "recipes", REPO_RECIPES):
        for suf in SUFFIXES:
            if (root / f"{name}{suf}").is_file():
                return root / f"{name}{suf}"
    raise ConfigError(f"no recipe or config file {name!r} (looked for a path, then recipes/{name}.yaml)")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`key=value` or `stage.key=value` (value parsed as YAML) applied to a recipe or config dict."""
    d = copy.deepcopy(d)
    stages = {s.get("name"): s for s in d.get("stages", [])}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key=value or stage.key=value")
        key, value = o.split("=", 1)
        value = yaml.safe_load(value)
        head, _, rest = key.partition(".")
        if rest and head in stages:
            stages[head][rest] = value
        elif "stages" in d:
            for s in d["stages"]:
                if s.get("type", "train") == "train":
                    s[key] = value
        else:
            d[key] = value
    return d


def unigram_entropy(cfg: TrainConfig, tok, n_samples: int = 64) -> float | None:
    """Entropy (nats/token) of the unigram distribution of the stage's text labels: the loss a model that
    ignores context would reach. Training loss well below it shows the model uses context."""
    from omnimini.train.trainer import build_mixture

    specs = [s for s in cfg.data if s.kind == "text"]
    if not specs:
        return None
    mix = build_mixture(specs, tok, None, cfg, cfg.seed)
    counts: Counter = Counter()
    for _ in range(n_samples):
        counts.update(x for x in next(mix)["labels"] if x >= 0)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def _stage_dicts(d: dict) -> list[dict]:
    if "stages" not in d:
        return [{"name": "train", "type": "train", **d}]
    shared = {k: v for k, v in d.items() if k not in ("stages", "name", "description", "out_dir")}
    out = []
    for s in d["stages"]:
        if "name" not in s:
            raise ConfigError("every recipe stage needs a name")
        kind = s.get("type", "train")
        out.append({**(shared if kind == "train" else {}), **s, "type": kind})
    return out


def run_tokenizer_stage(s: dict, out: Path, data_dir) -> None:
    import torch.distributed as dist

    from omnimini.data.text import resolve_path
    from omnimini.tokenizer import Tokenizer

    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()  # rank 0 trains and saves the tokenizer; the others wait for it
        return
    if (out / "tokenizer.json").is_file():
        if dist.is_initialized():
            dist.barrier()
        return
    files = [str(resolve_path(f, data_dir)) for f in s.get("files", [])]
    out.mkdir(parents=True, exist_ok=True)
    if s.get("scene_texts"):  # scene prompts/captions, so the vocabulary covers the task language too
        files.append(str(write_scene_texts(out / "scene_texts.txt", int(s["scene_texts"]))))
    tok = Tokenizer.train(files, int(s.get("vocab_size", 2048)), show_progress=False)
    tok.save(out)
    if dist.is_initialized():
        dist.barrier()


def write_scene_texts(path: Path, n: int) -> Path:
    import random

    from omnimini.data.scene_samples import scene_caption
    from omnimini.data.scenes.tasks import FAMILIES, TRAIN_SEEDS
    from omnimini.data.scenes.world import generate_scene

    with open(path, "w") as f:
        for i in range(n):
            f.write(scene_caption(generate_scene(random.Random(f"tokenizer/{i}"))) + "\n\n")
            for fam in FAMILIES.values():
                if fam.name == "qa":
                    ep = fam.episode(TRAIN_SEEDS[i])
                    f.write(f"{ep.prompt}\n{ep.answer}\n\n")
    return path


def run_recipe(recipe: str | dict, out_dir: str | None = None, data_dir: str | None = None,
               overrides: list[str] | None = None, resume: bool = True) -> dict:
    d = read_config_file(find_recipe(recipe)) if isinstance(recipe, str) else recipe
    d = apply_overrides(d, overrides or [])
    single = "stages" not in d
    root = Path(out_dir or d.get("out_dir") or f"runs/{d.get('name', 'omnimini')}")
    data_dir = data_dir or d.get("data_dir") or data_root()
    results: dict = {}
    tok_dir = None
    for s in _stage_dicts(d):
        name, kind = s.pop("name"), s.pop("type")
        out = root if single else root / name
        if kind == "tokenizer":
            run_tokenizer_stage(s, out, data_dir)
            tok_dir = out
            results[name] = {"tokenizer": str(out)}
        elif kind == "train":
            results[name] = run_train_stage(s, out, data_dir, tok_dir, results, resume)
        elif kind == "vision_warmup":
            results[name] = run_vision_warmup_stage(s, out, results)
        elif kind == "scene_eval":
            results[name] = run_eval_stage(s, out, results)
        else:
            raise ConfigError(f"stage {name!r}: unknown type {kind!r} (tokenizer|train|vision_warmup|scene_eval)")
    if not single:
        (root / "recipe_report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _checkpoint_of(ref: str, results: dict) -> str:
    if ref in results and results[ref].get("checkpoint"):
        return results[ref]["checkpoint"]
    return ref


def run_train_stage(s: dict, out: Path, data_dir, tok_dir, results: dict, resume: bool) -> dict:
    from omnimini.train import trainer
    from omnimini.train.dist import init

    s = {**s, "out_dir": str(out), "data_dir": s.get("data_dir") or (str(data_dir) if data_dir else None)}
    if s.get("init_from"):
        s["init_from"] = _checkpoint_of(s["init_from"], results)
    if tok_dir and not s.get("tokenizer") and not s.get("init_from"):
        s["tokenizer"] = str(tok_dir)
    cfg = TrainConfig.from_dict(s)
    done = out / "report.json"
    if resume and done.is_file():
        rep = json.loads(done.read_text())
        if rep.get("steps") == cfg.steps:
            return rep
    tr = trainer.Trainer(cfg)
    report = {}
    if init().main and any(x.kind == "text" for x in cfg.data):
        report["unigram_entropy"] = unigram_entropy(cfg, tr.tok)
    if resume:
        tr.resume()
    report = {**tr.fit(), **report}
    if tr.info.main:
        done.write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(trainer.format_report(report))
    return report


def run_vision_warmup_stage(s: dict, out: Path, results: dict) -> dict:
    import torch.distributed as dist

    from omnimini.train.vision_warmup import VisionWarmupConfig, run_vision_warmup

    cfg = VisionWarmupConfig.from_dict({**s, "init_from": _checkpoint_of(s.get("init_from", ""), results)})
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    report = run_vision_warmup(cfg, out) if rank0 else {"checkpoint": str(out / "checkpoint")}
    if dist.is_initialized():  # a small stage: rank 0 trains the tower, the others wait for its checkpoint
        dist.barrier()
    return report


def run_eval_stage(s: dict, out: Path, results: dict) -> dict:
    from omnimini.model.model import OmniModel
    from omnimini.tokenizer import Tokenizer
    from omnimini.train.dist import init
    from omnimini.train.scene_eval import evaluate_scenes, evaluate_scenes_loglik

    if not init().main:
        return {}
    ckpt = _checkpoint_of(s["model"], results)
    model, tok = OmniModel.from_pretrained(ckpt), Tokenizer.from_dir(ckpt)
    mode = s.get("mode", "generate")
    if mode == "loglik":
        n = int(s.get("n", 200))
        res = evaluate_scenes_loglik(model, tok, n=n, progress=True)
        res["blind"] = evaluate_scenes_loglik(model, tok, n=n, blind=True)
        res["mismatched"] = evaluate_scenes_loglik(model, tok, n=n, mismatched=True)
    elif mode == "generate":
        kw = {"family": s.get("family", "qa"), "n": int(s.get("n", 200)), "qa_format": s.get("qa_format", "mc"),
              "batch_size": int(s.get("batch_size", 16))}
        res = evaluate_scenes(model, tok, progress=True, **kw)
        if s.get("blind_control"):  # the same questions with a blank image: what answer priors alone reach
            res["blind"] = evaluate_scenes(model, tok, blind=True, **kw)
    else:
        raise ConfigError(f"scene_eval mode must be generate|loglik, got {mode!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scene_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    return res
