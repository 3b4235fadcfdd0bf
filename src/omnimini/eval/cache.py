"""On-disk response cache: one JSON line per successful answer, so a killed run resumes.

Lines are appended and flushed as answers arrive; a torn last line (the process was killed
mid-write) is ignored on reload. Failed answers are never stored, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _image_digest(image) -> str:
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return "sha256:" + h.hexdigest()


def _canonical(obj: Any) -> Any:
    """JSON-able view of a request with images replaced by content hashes."""
    if isinstance(obj, dict):
        if obj.get("type") == "image" and "image" in obj:
            return {"type": "image", "sha256": _image_digest(obj["image"])}
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("data:") and len(obj) > 256:
        return "sha256:" + hashlib.sha256(obj.encode()).hexdigest()
    return obj


def cache_key(model_id: str, kind: str, request: Any, params: dict | None = None) -> str:
    blob = json.dumps(
        {"model": model_id, "kind": kind, "request": _canonical(request), "params": params or {}},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Append-only JSONL map from request hash to stored answer (a dict)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._data: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self._data[rec["key"]] = rec["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # torn write from an interrupted run

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        self._data[key] = value
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            f.flush()
