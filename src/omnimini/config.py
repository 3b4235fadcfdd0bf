"""Model configuration: plain dataclasses, named presets, and parameter accounting."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

# CPU weight formats of the engine (engine/quant.py): fbgemm's fp16 / int8, and GGUF block formats run by
# omnimini's own kernels (omnimini.kernels); listed here so the command line needs no torch import. "auto" (the
# serving default): a GGUF source keeps its own blocks on the kernels, anything else gets fp16 (runtime.py)
QUANTIZE_MODES = ("auto", "none", "fp16", "int8", "int4", "q8_0", "q4_0", "q4_1")
ACTIVATIONS = ("silu", "gelu_tanh")  # the gated MLP's activation functions (model/layers.py)


class ConfigError(ValueError):
    """A configuration that cannot describe a model (sizes that do not divide, unknown preset...)."""


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate: int = 256
    score_func: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3 style), computed in float32
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_intermediate: int = 0  # width of the (fused) shared expert MLP; 0 -> expert_intermediate * num_shared
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(H, 1)) scales the shared expert
    first_k_dense: int = 0  # the first k layers keep a dense MLP
    aux_loss_coef: float = 0.01  # Switch-style load balance loss weight (training)
    z_loss_coef: float = 0.001  # router z-loss weight (training)
    bias_update_rate: float = 0.0  # >0: aux-loss-free balancing, a selection-only bias nudged toward uniform load

    @property
    def shared_width(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.shared_intermediate or self.expert_intermediate * self.num_shared_experts


@dataclass
class VisionConfig:
    image_size: int = 224  # images are resized to a square of this side
    patch_size: int = 16
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 768
    pixel_shuffle: int = 2  # projector merges s*s neighbouring patches into one LM token
    max_grid: int = 32  # size of the learned row/column position tables
    # Subtract each image's mean token (see VisionEncoder.project). Needed when the LM and the tower train from
    # scratch together; a tower pre-trained on dense targets and read by a frozen LM (omnimini-vl) keeps it off,
    # since whole-image facts (one red shape: every token "red") live in that mean.
    center_tokens: bool = True
    token_scale: float = 0.02  # initial RMS of image tokens: the LM's token-embedding scale
    # CLIP-style towers (LLaVA), all off by default:
    class_token: bool = False  # a learned token before the patches (dropped from the output, LLaVA's "default")
    positions: str = "2d"  # "2d": row + column tables; "1d": one learned position per patch (+ class token)
    pre_norm: bool = False  # LayerNorm on the embeddings before the blocks (CLIP's pre_layrnorm)
    final_norm: bool = True  # LayerNorm after the blocks (off: LLaVA reads a hidden layer before it)
    act: str = "gelu"  # the blocks' MLP activation: "gelu" | "quick_gelu" (CLIP) | "gelu_tanh" (SigLIP)
    norm_eps: float = 1e-5
    # "omnimini": pixel shuffle, MLP, centring + RMSNorm; "mlp": Linear-GELU-Linear (LLaVA); "linear": pixel shuffle
    # and one bias-free Linear (Idefics3 / SmolVLM); "gemma3": average pooling of each pixel_shuffle x pixel_shuffle
    # block of patches, RMSNorm, one bias-free Linear (Gemma 3)
    projector: str = "omnimini"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # "square": stretch to image_size; "crop": shortest side to image_size, centre crop (CLIP); "tiles": Idefics3's
    # longest side to max_edge, then (split_images) sides rounded up to multiples of image_size, cut into
    # image_size tiles plus the whole image squeezed into one more tile, or (not split_images) stretched to one tile
    resize: str = "square"
    resample: str = "bicubic"  # PIL filter of every resize: "bicubic" | "lanczos" (Idefics3) | "bilinear" (Gemma 3)
    max_edge: int | None = None  # resize="tiles": the longest side first goes to this (None: kept)
    split_images: bool = False  # resize="tiles": tiles + global image (True) or the global image alone
    # how an image is written in the prompt: "repeat": the placeholder token once per image token (the template
    # frames it); "idefics3": each tile's tokens after <fake_token_around_image><row_r_col_c>, the global image's
    # after <fake_token_around_image><global-img>, as Idefics3's processor expands each <image>; "gemma3": the
    # template's <start_of_image> becomes "\n\n<start_of_image>" + placeholders + "<end_of_image>\n\n"; "qwen2vl":
    # the template's one <|image_pad|> per image becomes as many as that image (of its own size) gives tokens
    image_prompt: str = "repeat"
    # Qwen2-VL / Qwen2.5-VL towers (tower="qwen2vl", resize="smart"), all inert by default. Images keep their aspect
    # ratio: each is resized to multiples of patch_size * pixel_shuffle with min_pixels..max_pixels pixels, patched
    # at that size (no learned positions: 2D rotary angles of each patch's row and column in the attention), and
    # the pixel_shuffle x pixel_shuffle neighbours are merged (projector="qwen2vl": norm, Linear-GELU-Linear)
    tower: str = "vit"  # "vit": VisionEncoder; "qwen2vl": QwenVisionEncoder (model/qwen_vision.py)
    temporal_patch: int = 1  # frames per patch (Qwen: 2; a still image is its own two frames)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    norm: str = "layer"  # the blocks' norms: "layer" (LayerNorm) | "rms" (Qwen2.5-VL)
    mlp: str = "fc"  # the blocks' MLP: "fc" (fc2(act(fc1))) | "gated" (down(act(gate) * up), with biases: Qwen2.5-VL)
    rope_theta: float = 10000.0  # base of the tower's 2D rotary angles (tower="qwen2vl")
    # Qwen2.5-VL: window attention in windows of window_size x window_size pixels (0: every layer sees the whole
    # image), except the layers in full_attention_layers
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    # Gemma 3's pan-and-scan (pan_and_scan.py; image_prompt="gemma3", resize="square"): an image at least
    # pan_min_ratio times wider than tall (or taller than wide) is also shown as 2..pan_max_crops crops of at least
    # pan_min_crop px, each one more square view
    pan_and_scan: bool = False
    pan_min_crop: int = 256
    pan_max_crops: int = 4
    pan_min_ratio: float = 1.2

    def __post_init__(self):  # JSON gives lists back
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.full_attention_layers = tuple(self.full_attention_layers)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // self.pixel_shuffle) ** 2


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    intermediate_size: int = 384  # dense SwiGLU width
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear"|"llama3", "factor": ..., ...}
    rms_norm_eps: float = 1e-5
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    tie_embeddings: bool = False
    # Gemma-style options (all off by default):
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # softmax scale of q.k; None -> 1/sqrt(head_dim) (Gemma 3: query_pre_attn_scalar)
    sandwich_norm: bool = False  # Gemma 2/3: RMSNorm on the attention and MLP outputs before each residual add
    # Sliding-window attention (Mistral, Phi-3, Gemma 3): a query at position p sees keys at p-window+1..p
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None: every layer slides when a window is set
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3: 10000, unscaled); None: rope_theta
    moe: MoEConfig | None = None
    vision: VisionConfig | None = None
    image_token_id: int | None = None  # placeholder id the vision features replace
    # "causal": image tokens attend like text; "bidirectional": the tokens of one image (a contiguous run of
    # placeholders) also see each other's later positions (Gemma 3)
    image_attention: str = "causal"
    # Image-conditioned adapters: a small residual MLP per block that every position of a row from its first image
    # token onwards passes through (0 = none). A frozen LM cannot learn to read soft image tokens (measured:
    # SmolLM2-135M did not even answer "red" to a red word embedding in the image slot), and adapters at the image
    # positions alone gave it no way to change what its question and answer tokens look for; these do, while
    # every position before the first image (so every text-only request, and the shared system prompt of an image
    # request) computes exactly as without them.
    image_adapter_dim: int = 0
    # M-RoPE (Qwen2-VL): the rotary frequencies split into temporal / height / width sections (counts of the
    # head's dim/2 frequencies); an image token rotates each section by its own coordinate, a text token by its
    # position in all three (= plain RoPE). None: plain RoPE everywhere
    mrope_section: list[int] | None = None
    arch: str = "omnimini"  # the family the weights came from, informational

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.validate()

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def layer_slides(self, i: int) -> bool:
        """Whether layer i uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[i] == "sliding"

    def layer_is_moe(self, i: int) -> bool:
        return self.moe is not None and i >= self.moe.first_k_dense

    def validate(self) -> None:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.image_attention not in ("causal", "bidirectional"):
            raise ConfigError(f"image_attention must be causal|bidirectional, got {self.image_attention!r}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"qk_norm must be none|head|full, got {self.qk_norm!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.mrope_section is not None and (len(self.mrope_section) != 3
                                               or sum(self.mrope_section) != self.dim_head // 2):
            raise ConfigError(f"mrope_section {self.mrope_section} must be 3 counts summing to head_dim/2 "
                              f"({self.dim_head // 2})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"full", "sliding"}:
                raise ConfigError(f"layer_types must list 'full' or 'sliding' for each of the {self.num_layers} "
                                  f"layers, got {self.layer_types}")
        if self.moe is not None:
            m = self.moe
            if not 1 <= m.top_k <= m.num_experts:
                raise ConfigError(f"moe.top_k {m.top_k} must be in 1..num_experts ({m.num_experts})")
            if m.score_func not in ("softmax", "sigmoid"):
                raise ConfigError(f"moe.score_func must be softmax|sigmoid, got {m.score_func!r}")
        if self.vision is not None:
            v = self.vision
            if v.image_size % v.patch_size:
                raise ConfigError(f"vision.image_size {v.image_size} not divisible by patch_size {v.patch_size}")
            if v.grid % v.pixel_shuffle:
                raise ConfigError(f"vision grid {v.grid} not divisible by pixel_shuffle {v.pixel_shuffle}")
            if v.hidden_size % v.num_heads:
                raise ConfigError(f"vision.hidden_size {v.hidden_size} not divisible by heads {v.num_heads}")
            choices = {"positions": ("2d", "1d"), "act": ("gelu", "quick_gelu", "gelu_tanh", "silu"),
                       "projector": ("omnimini", "mlp", "linear", "gemma3", "qwen2vl"),
                       "resize": ("square", "crop", "tiles", "smart"),
                       "resample": ("bicubic", "lanczos", "bilinear"),
                       "image_prompt": ("repeat", "idefics3", "gemma3", "qwen2vl"), "tower": ("vit", "qwen2vl"),
                       "norm": ("layer", "rms"), "mlp": ("fc", "gated")}
            for key, allowed in choices.items():
                if getattr(v, key) not in allowed:
                    raise ConfigError(f"vision.{key} must be one of {', '.join(allowed)}, got {getattr(v, key)!r}")
            if v.class_token and v.positions != "1d":
                raise ConfigError("vision.class_token needs positions='1d'")
            if v.projector == "mlp" and v.pixel_shuffle != 1:
                raise ConfigError("vision.projector 'mlp' takes one token per patch (pixel_shuffle 1)")
            if v.max_edge is not None and v.max_edge < 1:
                raise ConfigError(f"vision.max_edge must be >= 1, got {v.max_edge}")
            if v.split_images and v.resize != "tiles":
                raise ConfigError("vision.split_images needs resize='tiles'")
            qwen = (v.tower == "qwen2vl", v.resize == "smart", v.projector == "qwen2vl")
            if any(qwen) and not all(qwen):
                raise ConfigError("vision.tower, resize and projector must all be 'qwen2vl'/'smart' or none of them")
            if v.pan_and_scan and (v.image_prompt != "gemma3" or v.resize != "square" or v.pan_min_crop < 1
                                   or v.pan_max_crops < 2):
                raise ConfigError("vision.pan_and_scan needs image_prompt='gemma3', resize='square', "
                                  "pan_min_crop >= 1 and pan_max_crops >= 2")
            if v.window_size and v.window_size % (v.patch_size * v.pixel_shuffle):
                raise ConfigError(f"vision.window_size {v.window_size} is not a multiple of patch_size x "
                                  f"pixel_shuffle ({v.patch_size * v.pixel_shuffle})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return strict_from_dict(cls, d, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"missing config file: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d.get("omnimini", d))


def strict_from_dict(cls, d: dict, what: str):
    """Build dataclass `cls` from `d`, refusing unknown keys (a typo must not be silently ignored)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} keys: {sorted(unknown)}")
    return cls(**d)


# ---- presets -------------------------------------------------------------------------------------------------

# Vocabulary sizes: nano/small train their own BPE; mini uses an o200k-sized vocabulary like GPT-4o.
O200K_VOCAB = 200_064


def _nano() -> ModelConfig:
    # a few million parameters: trains on 2 CPU cores in minutes, still MoE (8 experts, top-2) with vision
    return ModelConfig(
        vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
        max_seq_len=512, qk_norm="head", tie_embeddings=True,
        moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate=128, first_k_dense=1),
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=96, num_layers=2, num_heads=3,
                            intermediate_size=256, pixel_shuffle=2),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=32768, hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4, intermediate_size=1536,
        max_seq_len=2048, qk_norm="head", tie_embeddings=True,
        moe=MoEConfig(num_experts=16, top_k=2, expert_intermediate=512, num_shared_experts=1, first_k_dense=1),
        vision=VisionConfig(image_size=224, patch_size=16, hidden_size=384, num_layers=6, num_heads=6,
                            intermediate_size=1536, pixel_shuffle=2),
    )


def _mini() -> ModelConfig:
    # GPT-4o-mini-class: ~8B total parameters, ~2B active, o200k vocabulary, vision encoder (ViT-L-ish).
    return ModelConfig(
        vocab_size=O200K_VOCAB, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=4, head_dim=128,
        intermediate_size=6144, max_seq_len=131072, rope_theta=500000.0, qk_norm="head",
        moe=MoEConfig(num_experts=64, top_k=6, expert_intermediate=704, num_shared_experts=2, first_k_dense=1),
        vision=VisionConfig(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096, pixel_shuffle=2, max_grid=64),
    )


def _tiny_dense() -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128)


PRESETS = {"nano": _nano, "small": _small, "mini": _mini, "tiny-dense": _tiny_dense}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---- parameter accounting ------------------------------------------------------------------------------------

def _mlp(h: int, i: int) -> int:
    return 3 * h * i  # SwiGLU: gate, up, down


def param_counts(cfg: ModelConfig) -> dict:
    """Total and active-per-token parameter counts, split by component (matches OmniModel's tensors)."""
    h, d = cfg.hidden_size, cfg.dim_head
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.attention_bias else 0)
    attn += {"none": 0, "head": 2 * d, "full": q + kv}[cfg.qk_norm]
    norms = (4 if cfg.sandwich_norm else 2) * h
    c = {"embeddings": cfg.vocab_size * h, "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * h,
         "attention": cfg.num_layers * (attn + norms) + h, "dense_mlp": 0, "experts": 0, "experts_active": 0,
         "shared_experts": 0, "router": 0, "vision": 0}
    for i in range(cfg.num_layers):
        if not cfg.layer_is_moe(i):
            c["dense_mlp"] += _mlp(h, cfg.intermediate_size)
            continue
        m = cfg.moe
        c["router"] += h * m.num_experts
        c["experts"] += m.num_experts * _mlp(h, m.expert_intermediate)
        c["experts_active"] += m.top_k * _mlp(h, m.expert_intermediate)
        if m.shared_width:
            c["shared_experts"] += _mlp(h, m.shared_width) + (h if m.shared_expert_gate else 0)
    if cfg.vision is not None:
        v = cfg.vision
        vh = v.hidden_size
        per_block = 4 * vh * vh + 4 * vh + 2 * vh * v.intermediate_size + v.intermediate_size + vh + 4 * vh
        proj_in = vh * v.pixel_shuffle ** 2
        c["vision"] = (3 * v.patch_size ** 2 * vh + vh + 2 * v.max_grid * vh + v.num_layers * per_block + 2 * vh
                       + proj_in * h + h + h * h + h + h)
    shared = c["attention"] + c["dense_mlp"] + c["shared_experts"] + c["router"] + c["embeddings"] + c["lm_head"]
    c["total_params"] = shared + c["experts"] + c["vision"]
    # Active per text token: everything a token touches (embedding row counted like the lm_head, as is customary).
    c["active_params"] = shared + c["experts_active"]
    return c


def training_figures(total_params: int, tokens: int | None) -> dict:
    """Token:param ratio and ALScore = sqrt(params_B * tokens_B) / 300, as on GPT-4o mini's model card."""
    if not tokens:
        return {"tokens": None, "token_param_ratio": None, "alscore": None}
    ratio = tokens / total_params
    return {"tokens": tokens, "token_param_ratio": ratio,
            "alscore": math.sqrt(total_params / 1e9 * tokens / 1e9) / 300}


def compute_verdict(ratio: float | None) -> str:
    if ratio is None:
        return "unknown (no training-token figure)"
    if ratio < 15:
        return "under-trained relative to Chinchilla (~20 tokens/param)"
    if ratio <= 30:
        return "about compute-optimal (Chinchilla ~20 tokens/param)"
    return f"over-trained for inference efficiency ({ratio / 20:.0f}x Chinchilla's ~20 tokens/param)"


def parse_count(s: str) -> int:
    """'13T', '8B', '500M', '1e12', '123' -> int."""
    s = s.strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ConfigError(f"cannot read {s!r} as a count (examples: 13T, 8B, 2.5e12)") from None

