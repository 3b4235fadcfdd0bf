"""omnimini's checkpoint directory: config.json + model.safetensors (sharded when large) + tokenizer.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from omnimini.config import ConfigError, ModelConfig

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not match its config."""


def _atomic_save(tensors: dict, path: Path) -> None:
    # write-then-rename: a crash or a full disk never leaves a half-written file under the real name
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _shards(state: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    return shards + [cur]


def save_model(model, path, tokenizer=None, max_shard_bytes: int = 2 * 1024 ** 3) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        _atomic_save(shards[0], out / "model.safetensors")
        (out / INDEX).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, out / name)
            weight_map.update(dict.fromkeys(shard, name))
        (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    model.config.save(out / "config.json")
    if tokenizer is not None:
        tokenizer.save(out)


def _files(d: Path) -> list[Path]:
    if (d / INDEX).exists():
        idx = json.loads((d / INDEX).read_text())
        return [d / f for f in sorted(set(idx["weight_map"].values()))]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    raise CheckpointError(f"{d}: no model.safetensors (or {INDEX}) found")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors from safetensors files, with errors that name the file."""
    state = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"missing weight file: {f}")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return state


def check_state(model, state: dict, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]} (not in this config)")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, "
                                  f"config expects {tuple(t.shape)}")


def build_model(cfg: ModelConfig, state: dict, where: str, device="cpu", dtype=torch.float32):
    """Instantiate OmniModel without random init (meta device) and assign the given tensors."""
    from omnimini.model.layers import Rotary
    from omnimini.model.model import OmniModel

    with torch.device("meta"):
        model = OmniModel(cfg)
    check_state(model, state, where)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    for m in model.modules():  # non-persistent rotary buffers were left on the meta device
        if isinstance(m, Rotary):
            m.reset(device)
    return model.eval()


def load_model(path, device="cpu", dtype=torch.float32):
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d}: missing config.json")
    try:
        cfg = ModelConfig.load(d / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    files = _files(d)
    return build_model(cfg, read_safetensors(files), str(d), device, dtype)
