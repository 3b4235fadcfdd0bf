"""Hugging Face checkpoints (config.json + safetensors + tokenizer.json) -> OmniModel.

Supported families: Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Phi-3 and Gemma 3 (text).
They all share one decoder layout (pre-norm GQA attention with rotate-half RoPE, SwiGLU or top-k MoE), so loading
is a config mapping plus a tensor rename; per-expert tensors are stacked into OmniModel's fused `gate_up` / `down`
layout, Phi-3's fused qkv / gate_up are split, and Gemma's (1 + w) norm weights are stored as 1 + w. What
differs is a config option of OmniModel: sliding-window layers (Mistral, Phi-3, Gemma 3), Gemma's embedding
scale, sandwich norms, query scale, GeGLU and the sliding layers' own rope base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omnimini.config import ConfigError, ModelConfig, MoEConfig
from omnimini.weights.checkpoint import CheckpointError, build_model, read_safetensors

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "mistral", "phi3",
                         "gemma3_text")
GEMMA = ("gemma3_text",)
# CLIP tower + MLP projector (hf_llava.py); SigLIP tower + pixel shuffle + linear projector, images split into tiles
# (hf_idefics3.py); SigLIP tower + pooling projector on Gemma 3 (hf_gemma3.py); native-resolution ViT + patch
# merger on Qwen2 with M-RoPE (hf_qwen2vl.py); each with one of the text families
VISION_LANGUAGE = ("llava", "idefics3", "smolvlm", "gemma3", "qwen2_vl", "qwen2_5_vl")
SUPPORTED_ROPE = ("default", "linear", "llama3")
HF_INDEX = "model.safetensors.index.json"


def _supported() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES + VISION_LANGUAGE)


# ---- config --------------------------------------------------------------------------------------------------

def _rope(c: dict) -> tuple[float, dict | None]:
    # transformers 5 nests rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling
    params = dict(c.get("rope_parameters") or {})
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' rope; see _local_theta
        params = dict(params["full_attention"] or {})
    if float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise CheckpointError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    params.pop("partial_rotary_factor", None)
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
    if mt in ("llama", "qwen2", "qwen3", "mistral", "phi3") + GEMMA:
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


def _local_theta(c: dict, mt: str) -> float | None:
    """Gemma 3's sliding layers rotate with their own (unscaled) base."""
    if mt not in GEMMA:
        return None
    local = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
    return float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)))


def _window(c: dict, mt: str, n_layers: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as OmniModel takes them; (None, None) when no layer slides."""
    window = c.get("sliding_window")
    if mt.startswith("qwen") and not c.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window they do not use unless use_sliding_window is set
    if not window:
        return None, None
    types = c.get("layer_types")
    if not types:
        return int(window), None  # Mistral, Phi-3, Mixtral: every layer slides
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    unknown = sorted(set(types) - set(names))
    if unknown or len(types) != n_layers:
        raise CheckpointError(f"{mt}: unsupported layer_types {unknown or types} (supported: {', '.join(names)})")
    if "sliding_attention" not in types:
        return None, None
    return int(window), [names[t] for t in types]


def _gemma_options(c: dict, mt: str) -> dict:
    if mt not in GEMMA:
        return {}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key) is not None:
            raise CheckpointError(f"{mt}: {key}={c[key]} is not supported (supported: null)")
    if c.get("use_bidirectional_attention"):
        raise CheckpointError(f"{mt}: use_bidirectional_attention=true is not supported")
    return {"embed_scale": float(c["hidden_size"]) ** 0.5, "sandwich_norm": True,
            "attn_scale": float(c.get("query_pre_attn_scalar", c.get("head_dim") or 256)) ** -0.5}


ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def config_from_hf(c: dict) -> ModelConfig:
    """Map a Hugging Face config.json dict onto ModelConfig (arch = the HF model_type)."""
    mt = c.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {mt!r} (supported: {_supported()})")
    act = c.get("hidden_activation") or c.get("hidden_act", "silu")
    if act not in ACTS:
        raise CheckpointError(f"unsupported hidden_act {act!r} for {mt} (supported: {', '.join(ACTS)})")
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
        window, layer_types = _window(c, mt, layers)
        return ModelConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim"),
            intermediate_size=c.get("intermediate_size", 0), max_seq_len=int(c.get("max_position_embeddings", 4096)),
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "gemma3_text": "head"}.get(mt, "none"),
            attention_bias=bias, tie_embeddings=bool(c.get("tie_word_embeddings", mt in GEMMA)),
            hidden_act=ACTS[act], sliding_window=window, layer_types=layer_types,
            rope_local_theta=_local_theta(c, mt), moe=_moe(c, mt, layers), arch=mt, **_gemma_options(c, mt),
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
# Gemma's four norms per layer: post_attention_layernorm is the attention output's norm, not the MLP's input
_GEMMA_RENAMES = [(re.compile(p + "$"), r) for p, r in [
    (_L + r"post_attention_layernorm\.weight", r"blocks.\1.attn_out_norm.weight"),
    (_L + r"pre_feedforward_layernorm\.weight", r"blocks.\1.post_norm.weight"),
    (_L + r"post_feedforward_layernorm\.weight", r"blocks.\1.mlp_out_norm.weight"),
]]
_FUSED_QKV = re.compile(_L + r"self_attn\.qkv_proj\.weight$")  # Phi-3
_FUSED_GATE_UP = re.compile(_L + r"mlp\.gate_up_proj\.weight$")  # Phi-3: gate rows first, then up
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
    renames = (_GEMMA_RENAMES + _RENAMES) if cfg.arch in GEMMA else _RENAMES
    for name, t in hf.items():
        if _IGNORED.match(name):
            continue
        if m := _FUSED_QKV.match(name):
            q, kv = cfg.num_heads * cfg.dim_head, cfg.num_kv_heads * cfg.dim_head
            for part, w in zip("qkv", t.split([q, kv, kv]), strict=True):
                state[f"blocks.{m[1]}.attn.{part}_proj.weight"] = w
            continue
        if m := _FUSED_GATE_UP.match(name):
            gate, up = t.chunk(2)
            state[f"blocks.{m[1]}.mlp.gate_proj.weight"], state[f"blocks.{m[1]}.mlp.up_proj.weight"] = gate, up
            continue
        if m := _EXPERT.match(name):
            experts.setdefault(int(m[1]), {})[int(m[2]), _ROLE[m[3]]] = t
            continue
        if m := _FUSED.match(name):
            state[f"blocks.{m[1]}.mlp.{'gate_up' if m[2] == 'gate_up_proj' else 'down'}"] = t
            continue
        for pat, repl in renames:
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
    if cfg.arch in GEMMA:  # Gemma's RMSNorm scales by (1 + w): store 1 + w, so OmniModel's RMSNorm computes the same
        for name in [n for n in state if n.endswith("norm.weight")]:
            state[name] = state[name].float() + 1.0
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
    c = read_hf_config(d)
    if c.get("model_type") in VISION_LANGUAGE:
        return _load_vlm(d, c, device, dtype)
    cfg = config_from_hf(c)
    state = convert_state(read_safetensors(_weight_files(d)), cfg)
    return build_model(cfg, state, f"{d} ({cfg.arch})", device, dtype)


def _load_vlm(d: Path, c: dict, device, dtype):
    import dataclasses

    from omnimini.weights import hf_gemma3, hf_idefics3, hf_llava, hf_qwen2vl

    mt = c["model_type"]
    family = {"llava": hf_llava, "gemma3": hf_gemma3, "qwen2_vl": hf_qwen2vl,
              "qwen2_5_vl": hf_qwen2vl}.get(mt, hf_idefics3)
    vision, image_token = family.vision_config(c, d)  # first: a missing preprocessor config is named up front
    text = config_from_hf(family.text_config(c))
    lm, tower = family.split_state(read_safetensors(_weight_files(d)), vision)
    if family in (hf_idefics3, hf_qwen2vl):  # an exported head means an untied one, whichever config says
        text = dataclasses.replace(text, tie_embeddings="lm_head.weight" not in lm)
    extra = {"mrope_section": hf_qwen2vl.mrope_section(c)} if family is hf_qwen2vl else {}
    try:
        cfg = dataclasses.replace(text, vision=vision, image_token_id=image_token, arch=mt,
                                  image_attention="bidirectional" if family is hf_gemma3 else "causal", **extra)
    except ConfigError as e:
        raise CheckpointError(f"{mt} config.json: {e}") from None
    state = {**convert_state(lm, text), **tower}
    return build_model(cfg, state, f"{d} ({mt})", device, dtype)


def load_hf(path, device="cpu", dtype=torch.float32):
    """Load a Hugging Face model directory -> (OmniModel, Tokenizer)."""
    from omnimini.tokenizer import Tokenizer

    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"Hugging Face model directory not found: {d}")
    model = load_hf_model(d, device, dtype)
    tok = Tokenizer.from_dir(d)
    if model.config.arch in VISION_LANGUAGE:  # its template writes one placeholder per image
        tok.image_token = tok.id_to_token(model.config.image_token_id)
        tok.expand_image_token = True
        if model.config.vision.image_prompt == "idefics3":
            from omnimini.weights.hf_idefics3 import check_tokenizer

            check_tokenizer(tok, model.config.vision, str(d))
        elif model.config.vision.image_prompt == "gemma3":
            from omnimini.images import GEMMA_BOI
            from omnimini.weights.hf_gemma3 import check_tokenizer

            check_tokenizer(tok, str(d))
            tok.image_placeholder = GEMMA_BOI  # what its template writes; the processor's expansion replaces it
    check_vocab(tok, model.config, str(d))
    return model, tok
