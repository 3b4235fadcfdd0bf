"""A fast GGUF reader: the header, metadata and tensor table parsed in one pass, tensor data as views of a memmap.

gguf's own GGUFReader builds several numpy views per metadata item; for a 262k-token vocabulary (Gemma 3) that
took 15-45 s on this machine before any weight was read. Here a string array is decoded in one Python loop and
a numeric array is one np.frombuffer. The tensors look like GGUFReader's (name, tensor_type, shape in ggml
order, data: float arrays for F32/F16, raw uint8 blocks otherwise), so gguf.quants.dequantize reads them as is.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files, versions 2 and 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_FLOAT_TENSORS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


class GGUFFormatError(ValueError):
    """Not a GGUF file, or one cut short."""


@dataclass
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order (fastest-varying dimension first), as GGUFReader gives it
    data: np.ndarray  # a view of the file


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError("file ends inside the metadata")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError("file ends inside a string")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.scalar(_SCALAR[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise GGUFFormatError(f"unknown metadata value type {kind}")
        item, count = self.scalar("<I"), self.scalar("<Q")
        if item in _NUMPY:
            size = np.dtype(_NUMPY[item]).itemsize * count
            if self.pos + size > len(self.buf):
                raise GGUFFormatError("file ends inside an array")
            arr = np.frombuffer(self.buf, dtype=_NUMPY[item], count=count, offset=self.pos)
            self.pos += size
            return arr.tolist()
        return [self.value(item) for _ in range(count)]


class GGUFFile:
    """`fields`: metadata key -> Python value; `tensors`: the tensor table, data viewed from a read-only memmap."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r", dtype=np.uint8)
        buf = memoryview(self._map)
        if bytes(buf[:4]) != MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.fields: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cur.pos // align) * align
        self.tensors: list[Tensor] = []
        for name, dims, kind, offset in infos:
            qtype = GGMLQuantizationType(kind)
            np_shape = tuple(reversed(dims))
            n = int(np.prod(dims)) if dims else 1
            if qtype.name in _FLOAT_TENSORS:
                dtype = _FLOAT_TENSORS[qtype.name]
                nbytes = n * np.dtype(dtype).itemsize
            else:
                block, size = GGML_QUANT_SIZES[qtype]
                dtype, nbytes = np.uint8, n // block * size
                np_shape = quant_shape_to_byte_shape(np_shape, qtype)
            at = start + offset
            if at + nbytes > len(self._map):
                raise GGUFFormatError(f"tensor {name} runs past the end of the file")
            data = self._map[at:at + nbytes].view(dtype).reshape(np_shape)
            self.tensors.append(Tensor(name, qtype, dims, data))
