"""A GGUF model served on its own blocks: the weights stored in a format omnimini's kernels run (Q8_0 / Q4_0 /
Q4_1) are used as they are, never rounded again; other quantized types are re-quantized from their dequantized
values with a warning naming the type."""

from __future__ import annotations

import warnings
from pathlib import Path

from omnimini.kernels.blocks import FORMATS

FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_source(spec) -> Path | None:
    """The GGUF file behind a model spec (a .gguf path or the default model), else None."""
    from omnimini.weights.convert import detect

    kind = detect(spec)
    if kind == "default":
        from omnimini.weights.default import default_gguf

        return default_gguf()
    return Path(spec) if kind == "gguf" else None


def load_native(path, mode: str):
    """(float model, tokenizer, native) for a GGUF file: `native` is engine.quant.quantize_model's argument, the
    data_ptr of each float weight -> (format, blocks, tensor name) read straight from the file."""
    from omnimini.weights.gguf_loader import block_tensors, load_gguf, open_gguf

    reader = open_gguf(path)
    model, tok = load_gguf(path, reader=reader)
    raw = block_tensors(reader, model.config, tuple(f.upper() for f in FORMATS))
    params = dict(model.named_parameters())
    other = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
                   - {f.upper() for f in FORMATS} - set(FLOAT_TYPES))
    if other:
        warnings.warn(f"{Path(path).name}: tensor type(s) {', '.join(other)} have no omnimini kernel; those "
                      f"weights are re-quantized to {mode} from their dequantized values", RuntimeWarning,
                      stacklevel=2)
    return model, tok, {params[name].data_ptr(): value for name, value in raw.items() if name in params}
