"""omnimini's own CPU kernels (C++, AVX2/FMA/F16C), registered as PyTorch custom ops `torch.ops.omnimini_cpu.*`.

The sources in csrc/ are compiled on first use with torch.utils.cpp_extension (g++ and ninja) into
`$OMNIMINI_CACHE/kernels` (default ~/.cache/omnimini/kernels), in a directory named after the sources' hash, so a
changed source rebuilds once and later starts only load the library. When the kernels cannot be used (the env var
OMNIMINI_NO_KERNELS=1, a CPU without AVX2, no compiler, a build error) `available()` is False, one warning names
why, and callers take their pure-PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("qlinear.cpp", "attention.cpp", "pointwise.cpp", "pool.cpp", "decode_layer.cpp")
HEADERS = ("pool.h", "ops.h")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-pthread"]
# added where the CPU has them (the library is built on the machine that runs it, and cached per flag set):
# vpdpbusd does the int8 dot products of a block in one instruction (qlinear.cpp dot_i32)
VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def build_flags() -> list[str]:
    have = _cpu_flags()
    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= have and os.environ.get("OMNIMINI_NO_VNNI") != "1"
    return FLAGS + (VNNI_FLAGS if vnni else [])
DISABLE_ENV = "OMNIMINI_NO_KERNELS"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str (when not ok)


def cache_dir() -> Path:
    root = os.environ.get("OMNIMINI_CACHE") or Path.home() / ".cache" / "omnimini"
    return Path(root).expanduser() / "kernels"


def _source_hash() -> str:
    h = hashlib.sha256(torch.__version__.encode() + " ".join(build_flags()).encode())
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def _cannot_run() -> str | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2 (PyTorch reports {cap})"
    return None


def _build() -> None:
    from torch.utils import cpp_extension

    digest = _source_hash()
    out = cache_dir() / digest
    name = f"omnimini_kernels_{digest}"
    lib = out / f"{name}.so"
    if lib.is_file():  # built before: load it without asking ninja (no compiler needed to run)
        torch.ops.load_library(str(lib))
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) puts its binary next to the venv's python
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise RuntimeError("ninja is not installed (pip install ninja)") from None
    out.mkdir(parents=True, exist_ok=True)
    print(f"omnimini: building CPU kernels once into {out} (g++, ~30 s)...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=build_flags(),
                       extra_ldflags=["-fopenmp"], build_directory=str(out), is_python_module=False,
                       verbose=False)
    print(f"omnimini: CPU kernels built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def _register_fakes() -> None:
    # shapes for torch.compile / meta tensors: the ops' outputs without running them (once per process)
    if _state.get("fakes"):
        return
    _state["fakes"] = True

    @torch.library.register_fake("omnimini_cpu::qlinear")
    def _(x, w, fmt, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("omnimini_cpu::rms_norm")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("omnimini_cpu::silu_mul")
    def _(gu):
        return gu.new_empty(gu.shape[0], gu.shape[1] // 2)

    @torch.library.register_fake("omnimini_cpu::attn_decode")
    def _(qkv, k_cache, v_cache, slots, positions, cos, sin, heads, kv_heads, scale, window):
        return qkv.new_empty(qkv.shape[0], heads * k_cache.shape[-1])

    @torch.library.register_fake("omnimini_cpu::decode_layer")
    def _(x, *args):
        return torch.empty_like(x)

    @torch.library.register_fake("omnimini_cpu::decode_layers")
    def _(x, *args):
        return torch.empty_like(x)


def available() -> bool:
    """True when torch.ops.omnimini_cpu is usable (building it on the first call)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        why = _cannot_run()
        if why is None:
            try:
                _build()
                _register_fakes()
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the PyTorch path
                first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                why = f"building them failed ({type(e).__name__}: {first[:200]})"
        _state["ok"] = why is None
        if why is not None:
            _state["why"] = why
            warnings.warn(f"omnimini CPU kernels unavailable: {why}; using the slower PyTorch path",
                          RuntimeWarning, stacklevel=2)
        return _state["ok"]


def why_unavailable() -> str | None:
    return None if available() else _state["why"]


def reset_for_tests() -> None:
    """Forget the cached decision (tests flip OMNIMINI_NO_KERNELS); a loaded library stays loaded."""
    with _lock:
        for key in ("ok", "why"):
            _state.pop(key, None)


def usable(x: torch.Tensor) -> bool:
    """Whether an inference op on `x` may take a kernel: float32 on CPU, no autograd graph being recorded."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() and available()


def qlinear(x2: torch.Tensor, blocks: torch.Tensor, fmt, out_features: int) -> torch.Tensor:
    """x2 [M, K] float32 @ W^T with W [out_features, K] in block format `fmt` (kernels.blocks.BlockFormat)."""
    if available():
        return torch.ops.omnimini_cpu.qlinear(x2, blocks, fmt.code, out_features)
    from omnimini.kernels.blocks import reference_matmul

    return reference_matmul(x2, blocks, fmt)
