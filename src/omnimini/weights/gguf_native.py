"""A GGUF model served on its own blocks: the weights stored in a format omnimini's kernels run (Q8_0 / Q4_0 /
Q4_1 / Q4_K / Q6_K) are used as they are, never rounded again; other quantized types are re-quantized from their
dequantized values with a warning naming the type."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from omnimini.kernels.blocks import ALL_FORMATS

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCKS_FILE = "gguf-blocks.safetensors"  # beside the default model's converted checkpoint
OTHER_KEY = "__types_without_kernel__"


def gguf_source(spec) -> Path | None:
    """The GGUF file behind a model spec (a .gguf path or the default model), else None."""
    from omnimini.weights.convert import detect

    kind = detect(spec)
    if kind == "default":
        from omnimini.weights.default import default_gguf

        return default_gguf()
    return Path(spec) if kind == "gguf" else None


def load_native(spec, path, mode: str):
    """(float model, tokenizer, native) for a GGUF file: `native` is engine.quant.quantize_model's argument, the
    data_ptr of each float weight -> (format, blocks, tensor name) read straight from the file. The default model
    reads its blocks from a copy cached beside its converted checkpoint (parsing the GGUF takes seconds)."""
    from omnimini.weights.convert import detect
    from omnimini.weights.gguf_loader import load_gguf, open_gguf

    if detect(spec) == "default":
        model, tok, raw, other = _default_blocks(path)
    else:
        reader = open_gguf(path)
        model, tok = load_gguf(path, reader=reader)
        raw, other = _read_blocks(reader, model.config)
    if other:
        warnings.warn(f"{Path(path).name}: tensor type(s) {', '.join(other)} have no omnimini kernel; those "
                      f"weights are re-quantized to {mode} from their dequantized values", RuntimeWarning,
                      stacklevel=2)
    params = dict(model.named_parameters())
    return model, tok, {params[name].data_ptr(): value for name, value in raw.items() if name in params}


def _read_blocks(reader, cfg) -> tuple[dict, list[str]]:
    from omnimini.weights.gguf_loader import block_tensors

    raw = block_tensors(reader, cfg, tuple(f.upper() for f in ALL_FORMATS))
    other = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
                   - {f.upper() for f in ALL_FORMATS} - set(FLOAT_TYPES))
    return raw, other


def _default_blocks(path):
    """The default model: its converted checkpoint (config, tokenizer, float tensors) plus BLOCKS_FILE, the GGUF's
    raw blocks written there once (to a temporary name, then renamed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from omnimini.weights.convert import load_omnimini
    from omnimini.weights.default import default_model_dir
    from omnimini.weights.gguf_loader import open_gguf

    d = default_model_dir(quiet=True)
    model, tok = load_omnimini(d)
    cached = d / BLOCKS_FILE
    if not cached.is_file():
        raw, other = _read_blocks(open_gguf(path), model.config)
        meta = {name: f"{fmt} {gguf_name}" for name, (fmt, _, gguf_name) in raw.items()}
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        save_file({name: blocks for name, (_, blocks, _) in raw.items()}, str(tmp),
                  metadata={**meta, OTHER_KEY: ",".join(other)})
        os.replace(tmp, cached)
    with safe_open(str(cached), "pt") as f:
        meta = f.metadata()
        raw = {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            fmt, gguf_name = meta[name].split(" ", 1)
            raw[name] = (fmt, f.get_tensor(name), gguf_name)
    return model, tok, raw, [t for t in meta.get(OTHER_KEY, "").split(",") if t]
