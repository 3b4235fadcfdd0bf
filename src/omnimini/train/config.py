"""Training configuration: plain dataclasses, loaded from YAML / JSON / TOML files (a recipe or one stage)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from omnimini.config import ConfigError, ModelConfig, preset, strict_from_dict


@dataclass
class DataSpec:
    """One training data source. kind: text (packed) | chat (assistant-only labels) | scenes."""

    kind: str = "text"
    paths: list[str] = field(default_factory=list)
    weight: float = 1.0
    name: str | None = None
    text_key: str = "text"
    split: str = "paragraph"  # text: paragraph | line | file
    reset_positions: bool = False  # text: positions restart at every document
    scene_kind: str = "task"  # scenes: task | caption
    families: list[str] = field(default_factory=lambda: ["qa"])
    qa_format: str | None = None  # scenes/qa: mc | short | None (mixed)
    balanced_answers: bool = False  # scenes/qa: each template's answer uniform (QAFamily(balanced=True))
    substitutions: dict[str, str] = field(default_factory=dict)  # chat: e.g. {"{{name}}": "omnimini"}

    def __post_init__(self):
        if self.kind not in ("text", "chat", "scenes"):
            raise ConfigError(f"data kind must be text|chat|scenes, got {self.kind!r}")
        if self.kind != "scenes" and not self.paths:
            raise ConfigError(f"{self.kind} data needs 'paths'")
        if isinstance(self.paths, str):
            self.paths = [self.paths]


@dataclass
class TrainConfig:
    out_dir: str = "runs/omnimini"
    model: str | dict = "nano"  # preset name, path to a config.json, or a dict of ModelConfig fields
    model_overrides: dict = field(default_factory=dict)  # applied on top of `model` (e.g. num_layers: 2)
    init_from: str | None = None  # start from these weights (a checkpoint directory) instead of random init
    tokenizer: str | None = None  # tokenizer directory (defaults to init_from's)
    data: list[DataSpec] = field(default_factory=list)
    val_data: list[DataSpec] = field(default_factory=list)
    data_dir: str | None = None  # relative data paths are looked up here (--data / OMNIMINI_DATA)
    strict_data: bool = False  # bad input lines are fatal instead of skipped
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    vision_lr_mult: float = 1.0  # learning rate of the vision encoder + projector relative to lr
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    loss_norm: str = "token"  # token: mean over the batch's label tokens | sample: mean of per-sample means
    seed: int = 0
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 autocast on GPU) | float32 | bfloat16
    device: str = "auto"
    compile: bool = False
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    val_batches: int = 4
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    peak_tflops: float | None = None  # for MFU; None: a GPU table or a measured CPU matmul peak
    progress: bool = True
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default); 1 is fastest on a busy box

    def __post_init__(self):
        self.data = [d if isinstance(d, DataSpec) else DataSpec(**d) for d in self.data]
        self.val_data = [d if isinstance(d, DataSpec) else DataSpec(**d) for d in self.val_data]
        for name in ("seq_len", "micro_batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} must be in 0..steps ({self.steps})")
        if self.loss_norm not in ("token", "sample"):
            raise ConfigError(f"loss_norm must be token|sample, got {self.loss_norm!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto|float32|bfloat16, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return strict_from_dict(cls, d, "training config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, dict):
            d = dict(self.model)
        elif Path(self.model).suffix == ".json" or Path(self.model).is_dir():
            p = Path(self.model)
            d = ModelConfig.load(p / "config.json" if p.is_dir() else p).to_dict()
        else:
            d = preset(self.model).to_dict()
        for k, v in self.model_overrides.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return ModelConfig.from_dict(d)


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        elif p.suffix == ".toml":
            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except Exception as e:  # yaml/toml/json each raise their own error types
        raise ConfigError(f"{p}: cannot parse ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return d
