"""Training checkpoints: the foundation's model directory plus trainer_state.pt (optimizer, scheduler, data
position, RNG, loss history), written to a temporary directory and renamed into place, so a failed save
(full disk, crash) always leaves the previous checkpoint intact.

Layout: OUT/checkpoints/step_000100/{config.json, model.safetensors, tokenizer.json, ..., trainer_state.pt}
and OUT/checkpoints/latest (the name of the newest complete checkpoint). Model and optimizer state are stored
unsharded with parameter names as keys, so a run can resume with a different number of processes.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from omnimini.weights.checkpoint import CheckpointError, read_safetensors, save_model

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


class _Weights:
    """What save_model needs from a model: a config and a (full, CPU) state dict."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def full_model_state(model) -> dict:
    # collective under FSDP: every rank must call it
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, model, opt, sched, extra: dict, tokenizer=None,
                    main: bool = True, keep: int = 2) -> Path:
    root = Path(root)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    opt_sd = get_optimizer_state_dict(model, opt, options=opts)
    final = root / f"step_{step:06d}"
    if main:
        tmp = root / f".tmp-step_{step:06d}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(_Weights(model.config, model_sd), tmp, tokenizer=tokenizer)
            state = {"optimizer": opt_sd, "scheduler": sched.state_dict(), "step": step, "rng": rng_state(), **extra}
            torch.save(state, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_latest(root, final.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint and `latest` are untouched
            raise
        _prune(root, keep)
    _barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / STATE_FILE).is_file():
            return p
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, model, opt, sched) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return the rest (step, data state, history)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    weights = read_safetensors(sorted(path.glob("model*.safetensors")))
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, opt, state.pop("optimizer"), options=opts)
    sched.load_state_dict(state.pop("scheduler"))
    set_rng_state(state.pop("rng"))
    return state
