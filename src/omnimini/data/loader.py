"""Mixing resumable sample streams and collating samples into padded batches."""

from __future__ import annotations

import torch

from omnimini.data.chat import IGNORE
from omnimini.data.text import DataError


class Mixture:
    """Interleaves named sources by weight, deterministically (stride scheduling, no RNG): after n draws
    each source has been drawn about n * weight / sum(weights) times. Resumable via state_dict()."""

    def __init__(self, sources: dict[str, tuple[object, float]]):
        if not sources:
            raise DataError("no training data sources configured")
        for name, (_, w) in sources.items():
            if w <= 0:
                raise DataError(f"data source {name!r} has weight {w}; weights must be > 0")
        self.sources = sources
        self.counts = dict.fromkeys(sources, 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        name = min(self.sources, key=lambda n: ((self.counts[n] + 1) / self.sources[n][1], n))
        self.counts[name] += 1
        sample = next(self.sources[name][0])
        sample["source"] = name
        return sample

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "sources": {n: s.state_dict() for n, (s, _) in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["sources"]) != set(self.sources):
            raise DataError(f"resume state has data sources {sorted(state['sources'])}, the config has "
                            f"{sorted(self.sources)}")
        self.counts = dict(state["counts"])
        for n, (s, _) in self.sources.items():
            s.load_state_dict(state["sources"][n])


def collate(samples: list[dict], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad to the longest sample (or pad_to). Causal attention means padding at the end never changes
    the real tokens' outputs, so no attention mask is needed; padded labels are -100."""
    T = max(pad_to or 0, max(len(s["input_ids"]) for s in samples))
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    positions = torch.arange(T).repeat(len(samples), 1)
    has_pos = False
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        if s.get("positions") is not None:
            positions[i, :n] = torch.tensor(s["positions"])
            has_pos = True
    pix = [s["pixels"] for s in samples if s.get("pixels") is not None]
    return {"input_ids": ids, "labels": labels, "positions": positions if has_pos else None,
            "pixels": torch.cat(pix) if pix else None}
