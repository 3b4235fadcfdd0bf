"""The models a server hosts: one Engine each, looked up by id or alias."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omnimini.engine.scheduler import Engine
from omnimini.serve.errors import APIError

log = logging.getLogger("omnimini.serve")


@dataclass
class ServedModel:
    id: str
    engine: Engine
    tokenizer: object
    created: int
    source: str

    @property
    def model(self):
        return self.engine.model

    @property
    def context(self) -> int:
        return self.engine.max_context


def model_id_for(spec: str | None) -> str:
    if spec is None:
        return "default"
    p = Path(spec)
    return p.stem if p.suffix == ".gguf" else (p.name or spec) if p.exists() else spec


class ModelRegistry:
    def __init__(self):
        self.models: dict[str, ServedModel] = {}
        self.aliases: dict[str, str | None] = {}
        self.default: str | None = None

    def add(self, model_id: str, model, tokenizer, source: str, **engine_kw) -> ServedModel:
        if model_id in self.models:
            raise ValueError(f"two models share the id {model_id!r}; give one an alias or another path")
        engine = Engine(model, tokenizer, name=model_id, **engine_kw)
        served = ServedModel(model_id, engine, tokenizer, int(time.time()), source)
        self.models[model_id] = served
        self.default = self.default or model_id
        return served

    def alias(self, name: str, target: str) -> None:
        if target not in self.models:
            raise ValueError(f"alias {name!r} points at {target!r}, which is not served "
                             f"(served: {', '.join(self.models)})")
        self.aliases[name] = target

    def get(self, name: str) -> ServedModel:
        key = self.aliases.get(name, name)
        if key not in self.models:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it. "
                                f"Available: {', '.join(self.ids())}.", param="model", code="model_not_found")
        return self.models[key]

    def ids(self) -> list[str]:
        return list(self.models) + [a for a in self.aliases if a not in self.models]

    def shutdown(self, wait: bool = True, timeout: float = 30.0) -> None:
        for m in self.models.values():
            m.engine.shutdown(wait=wait, timeout=timeout)


def load_registry(specs: list, aliases: dict[str, str | None], quantize: str = "none", mmproj: str | None = None,
                  **engine_kw) -> ModelRegistry:
    """Load every model spec (path, name, None for the default model, or a ready (id, model, tokenizer)).
    mmproj: a llama.cpp vision projector file for the one model served."""
    from omnimini.runtime import load_for_inference

    if mmproj is not None and len(specs or [None]) != 1:
        raise ValueError(f"--mmproj {mmproj}: give exactly one --model (the language model it belongs to)")
    reg = ModelRegistry()
    for spec in specs or [None]:
        if isinstance(spec, tuple):
            mid, model, tok = spec
            reg.add(mid, model, tok, source="in-memory", **engine_kw)
            continue
        model, tok = load_for_inference(spec, quantize=quantize, mmproj=mmproj)
        mid = model_id_for(spec) if spec is not None else _default_id(model)
        log.info("loaded %s as %s", spec or "the default model", mid)
        reg.add(mid, model, tok, source=str(spec), **engine_kw)
    for name, target in aliases.items():
        if not target:  # an alias without a target names the first (default) model
            target = reg.default
        reg.alias(name, target if target in reg.models else model_id_for(target))
    return reg


def _default_id(model) -> str:
    from omnimini.weights.default import DEFAULT_MODEL_NAME, TEXT_MODEL_NAME

    # without its vision file the default is the text model, and is named so
    return DEFAULT_MODEL_NAME if model.config.vision is not None else TEXT_MODEL_NAME
