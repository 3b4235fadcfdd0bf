"""Hugging Face checkpoints (config.json + safetensors + tokenizer.json) -> OmniModel.

Supported families: Llama, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. They all share one decoder
layout (pre-norm GQA attention with rotate-half RoPE, SwiGLU or top-k MoE), so loading is a config mapping
plus a tensor rename; per-expert tensors are stacked into OmniModel's fused `gate_up` / `down` layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omnimini.config import ConfigError, ModelConfig, MoEConfig
from omnimini.weights.checkpoint import CheckpointError, build_model, read_safetensors

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_ROPE = ("default", "linear", "llama3")
HF_INDEX = "model.safetensors.index.json"


def _supported() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


# ---- config --------------------------------------------------------------------------------------------------

def _rope(c: dict) -> tuple[float, dict | None]:
    # transformers 5 nests rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or params
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in SUPPORTED_ROPE:
        raise CheckpointError(f"unsupported rope scaling {kind!r} (supported: {', '.join(SUPPORTED_ROPE)})")
    if kind == "default":
        return float(theta), None
    return float(theta), {k: v for k, v in scaling.items() if k != "rope_theta"}


def _first_k_dense(c: dict, n_layers: int) -> int:
    """Qwen-MoE's `mlp_only_layers` / `decoder_sparse_step` as OmniModel's first-k-dense (the only pattern it has)."""
    step = c.get("decoder_sparse_step", 1) or 1
    dense_only = set(c.get("mlp_only_layers") or [])
    sparse = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    k = n_layers - len(sparse)
    if sparse != list(range(k, n_layers)):
        raise CheckpointError(f"MoE layers {sparse} are not a suffix of the {n_layers} layers; omnimini supports "
                              "dense layers only before the first MoE layer (mlp_only_layers=[0..k-1], "
                              "decoder_sparse_step=1)")
    return k


def _moe(c: dict, mt: str, n_layers: int) -> MoEConfig | None:
    if mt in ("llama", "qwen2", "qwen3"):
        return None
    if mt == "mixtral":  # softmax over all experts, then top-k renormalised: norm_topk_prob
        return MoEConfig(num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
                         expert_intermediate=c["intermediate_size"], norm_topk_prob=True)
    experts = c.get("num_experts", c.get("num_local_experts"))
    inter = c["intermediate_size"] if mt == "olmoe" else c["moe_intermediate_size"]
    m = MoEConfig(num_experts=experts, top_k=c["num_experts_per_tok"], expert_intermediate=inter,
                  norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    if mt == "qwen2_moe":
        m.num_shared_experts, m.shared_expert_gate = 1, True
        m.shared_intermediate = c["shared_expert_intermediate_size"]
    if mt in ("qwen2_moe", "qwen3_moe"):
        m.first_k_dense = _first_k_dense(c, n_layers)
    return m


def _max_len(c: dict, mt: str) -> int:
    n = int(c.get("max_position_embeddings", 4096))
    window = c.get("sliding_window")
    sliding = c.get("use_sliding_window", mt == "mixtral")
    if sliding and window and window < n:
        # OmniModel has no sliding-window mask: within the window the two agree exactly, so cap the context
        n = int(window)
    return n


def config_from_hf(c: dict) -> ModelConfig:
    """Map a Hugging Face config.json dict onto ModelConfig (arch = the HF model_type)."""
    mt = c.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {mt!r} (supported: {_supported()})")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"unsupported hidden_act {act!r} for {mt} (supported: silu)")
    if c.get("clip_qkv") is not None:
        raise CheckpointError(f"{mt}: clip_qkv={c['clip_qkv']} is not supported (supported: null)")
    if c.get("mlp_bias"):
        raise CheckpointError(f"{mt}: mlp_bias=true is not supported")
    theta, scaling = _rope(c)
    heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
    if mt in ("qwen2", "qwen2_moe"):
        bias = bool(c.get("qkv_bias", c.get("attention_bias", True)))
    else:
        bias = bool(c.get("attention_bias", False))
    try:
        return ModelConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim"),
            intermediate_size=c.get("intermediate_size", 0), max_seq_len=_max_len(c, mt), rope_theta=theta,
            rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(mt, "none"),
            attention_bias=bias, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            moe=_moe(c, mt, layers), arch=mt,
        )
    except KeyError as e:
        raise CheckpointError(f"{mt} config.json lacks required key {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{mt} config.json: {e}") from None


# ---- tensors -------------------------------------------------------------------------------------------------

_L = r"model\.layers\.(\d+)\."
_RENAMES = [
    (r"model\.embed_tokens\.weight", r"embed.weight"),
    (r"model\.norm\.weight", r"norm.weight"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (_L + r"input_layernorm\.weight", r"blocks.\1.input_norm.weight"),
    (_L + r"post_attention_layernorm\.weight", r"blocks.\1.post_norm.weight"),
    (_L + r"self_attn\.([qkvo])_proj\.(weight|bias)", r"blocks.\1.attn.\2_proj.\3"),
    (_L + r"self_attn\.([qk])_norm\.weight", r"blocks.\1.attn.\2_norm.weight"),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.mlp.\2_proj.weight"),
    (_L + r"(?:mlp|block_sparse_moe)\.gate\.weight", r"blocks.\1.mlp.router.weight"),
    (_L + r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blocks.\1.mlp.shared.\2_proj.weight"),
    (_L + r"mlp\.shared_expert_gate\.weight", r"blocks.\1.mlp.shared_gate.weight"),
]
_RENAMES = [(re.compile(p + "$"), r) for p, r in _RENAMES]
_EXPERT = re.compile(_L + r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(_L + r"mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers-5 in-memory layout
_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _fuse_experts(layer: int, parts: dict, cfg: ModelConfig) -> dict:
    E = cfg.moe.num_experts
    for e in range(E):
        for role in ("gate", "up", "down"):
            if (e, role) not in parts:
                raise CheckpointError(f"missing tensor for layer {layer} expert {e} ({role} projection)")
    extra = sorted({e for e, _ in parts if e >= E})
    if extra:
        raise CheckpointError(f"unexpected tensor: layer {layer} has expert {extra[0]} but num_experts is {E}")
    gate_up = torch.stack([torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(E)])
    down = torch.stack([parts[e, "down"] for e in range(E)])
    return {f"blocks.{layer}.mlp.gate_up": gate_up, f"blocks.{layer}.mlp.down": down}


def convert_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to OmniModel's names; stack per-expert weights; unknown names are an error."""
    state, experts = {}, {}
    for name, t in hf.items():
        if _IGNORED.match(name):
            continue
        if m := _EXPERT.match(name):
            experts.setdefault(int(m[1]), {})[int(m[2]), _ROLE[m[3]]] = t
            continue
        if m := _FUSED.match(name):
            state[f"blocks.{m[1]}.mlp.{'gate_up' if m[2] == 'gate_up_proj' else 'down'}"] = t
            continue
        for pat, repl in _RENAMES:
            if pat.match(name):
                state[pat.sub(repl, name)] = t
                break
        else:
            raise CheckpointError(f"unexpected tensor {name!r} for {cfg.arch} (no omnimini equivalent)")
    for layer, parts in experts.items():
        if cfg.moe is None or not cfg.layer_is_moe(layer):
            raise CheckpointError(f"unexpected expert tensors in layer {layer}: the config makes it dense")
        state.update(_fuse_experts(layer, parts, cfg))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some exports save the tied head too; the embedding is the truth
    for name, t in list(state.items()):
        if name.endswith("mlp.router.weight"):
            state[name.replace("router.weight", "router.selection_bias")] = torch.zeros(t.shape[0])
    return state


# ---- files ---------------------------------------------------------------------------------------------------

def _weight_files(d: Path) -> list[Path]:
    if (d / HF_INDEX).exists():
        try:
            idx = json.loads((d / HF_INDEX).read_text())
            return [d / f for f in sorted(set(idx["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{d / HF_INDEX}: not a valid safetensors index ({e})") from None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors weights (pytorch_model.bin is not supported)")
    return files


def read_hf_config(d: Path) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{d}: missing config.json (not a Hugging Face model directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def check_vocab(tokenizer, cfg: ModelConfig, where: str) -> None:
    """A tokenizer that can produce ids past the embedding table would crash mid-request: refuse it up front."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                              f"(embedding rows) is {cfg.vocab_size}: they do not belong together")


def load_hf_model(path, device="cpu", dtype=torch.float32):
    d = Path(path)
    cfg = config_from_hf(read_hf_config(d))
    state = convert_state(read_safetensors(_weight_files(d)), cfg)
    return build_model(cfg, state, f"{d} ({cfg.arch})", device, dtype)


def load_hf(path, device="cpu", dtype=torch.float32):
    """Load a Hugging Face model directory -> (OmniModel, Tokenizer)."""
    from omnimini.tokenizer import Tokenizer

    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"Hugging Face model directory not found: {d}")
    model = load_hf_model(d, device, dtype)
    tok = Tokenizer.from_dir(d)
    check_vocab(tok, model.config, str(d))
    return model, tok
