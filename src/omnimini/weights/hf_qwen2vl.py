"""Qwen2-VL / Qwen2.5-VL checkpoints (a native-resolution ViT + patch merger + a Qwen2 text model) -> OmniModel.

The tower (VisionConfig tower="qwen2vl", model/qwen_vision.py) takes each image at its own size, resized by
Qwen2-VL's smart_resize to multiples of patch x merge within min..max pixels (resize="smart"), so images give
different numbers of tokens; the template's one <|image_pad|> per image becomes that image's count
(image_prompt="qwen2vl"), framed by the template's own <|vision_start|> / <|vision_end|>. Qwen2-VL's blocks are
LayerNorm + (quick-)GELU MLP; Qwen2.5-VL's RMSNorm + SwiGLU MLP with biases and window attention outside
fullatt_block_indexes. The text model is Qwen2 with M-RoPE (ModelConfig.mrope_section): the rotary frequencies
split in temporal / height / width sections, which image tokens rotate by their grid coordinates.

transformers 5 nests the text settings in text_config; hub checkpoints written before keep them at the top level
(and name the rope `rope_scaling: {type: mrope}`); both are read. The image preprocessing comes from
preprocessor_config.json, which must be there.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from omnimini.config import VisionConfig
from omnimini.weights.checkpoint import CheckpointError
from omnimini.weights.hf_llava import PREPROCESSOR, check_standard_steps, read_preprocessor, resample

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
_VISUAL = re.compile(r"^(?:model\.)?visual\.(.+)$")
_TEXT = re.compile(r"^model\.language_model\.")
_BLOCK = re.compile(r"blocks\.(\d+)\.(?:attn\.|mlp\.)?(norm1|norm2|qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj)"
                    r"\.(weight|bias)$")
_MERGER = {"merger.ln_q": "merge_norm", "merger.mlp.0": "proj_fc1", "merger.mlp.2": "proj_fc2"}
# what a top-level (pre-transformers-5) config holds that is not the text model's
_NOT_TEXT = ("vision_config", "architectures", "image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "vision_token_id", "text_config")


def text_config(c: dict) -> dict:
    """The Qwen2 text model's settings, as hf.config_from_hf reads a qwen2 config (M-RoPE's section removed:
    mrope_section reads it)."""
    t = dict(c.get("text_config") or {k: v for k, v in c.items() if k not in _NOT_TEXT})
    t["model_type"] = "qwen2"
    t["attention_bias"] = True  # Qwen2-VL's q/k/v always carry biases
    if "tie_word_embeddings" in c:  # the top level decides (transformers 5); hf.py also unties an exported head
        t["tie_word_embeddings"] = c["tie_word_embeddings"]
    params = dict(t.get("rope_parameters") or {})
    scaling = dict(t.pop("rope_scaling", None) or {})
    theta = params.get("rope_theta", scaling.get("rope_theta", t.get("rope_theta", 1000000.0)))
    for d in (params, scaling):
        d.pop("mrope_section", None)
        if d.get("rope_type", d.get("type")) in ("mrope", "default"):
            d.pop("rope_type", None)
            d.pop("type", None)
    if scaling:
        raise CheckpointError(f"{c.get('model_type')}: rope scaling {scaling} besides M-RoPE is not supported")
    t["rope_parameters"] = {**params, "rope_theta": theta}
    t.pop("rope_theta", None)
    return t


def mrope_section(c: dict) -> list[int]:
    t = c.get("text_config") or c
    for d in (t.get("rope_parameters"), t.get("rope_scaling"), c.get("rope_scaling")):
        if isinstance(d, dict) and d.get("mrope_section"):
            return [int(x) for x in d["mrope_section"]]
    raise CheckpointError(f"{c.get('model_type')} config.json lacks rope mrope_section (M-RoPE's sections)")


def vision_config(c: dict, d: Path) -> tuple[VisionConfig, int]:
    """(VisionConfig, image_token_id) of a Qwen2-VL / Qwen2.5-VL config.json and its preprocessor_config.json."""
    mt = c.get("model_type")
    v = c.get("vision_config") or {}
    v25 = mt == "qwen2_5_vl"
    act = v.get("hidden_act", "silu" if v25 else "quick_gelu")
    if act not in _ACTS:
        raise CheckpointError(f"{mt}: vision hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
    channels = int(v.get("in_channels", v.get("in_chans", 3)))
    if channels != 3:
        raise CheckpointError(f"{mt}: vision in_channels={channels} is not supported (3)")
    try:
        width = int(v["hidden_size"] if v25 else v["embed_dim"])
        inter = int(v["intermediate_size"]) if v25 else width * int(v.get("mlp_ratio", 4))
        patch, merge = int(v.get("patch_size", 14)), int(v.get("spatial_merge_size", 2))
        frames = int(v.get("temporal_patch_size", 2))
        window = int(v.get("window_size", 0)) if v25 else 0
        full = tuple(int(i) for i in v.get("fullatt_block_indexes", ())) if v25 else ()
        theta = float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        cfg = VisionConfig(image_size=patch * merge, patch_size=patch, hidden_size=width,
                           num_layers=int(v["depth"]), num_heads=int(v["num_heads"]), intermediate_size=inter,
                           pixel_shuffle=merge, max_grid=1, class_token=False, positions="1d", pre_norm=False,
                           final_norm=False, act=_ACTS[act], norm_eps=1e-6, projector="qwen2vl",
                           image_prompt="qwen2vl", tower="qwen2vl", temporal_patch=frames,
                           norm="rms" if v25 else "layer", mlp="gated" if v25 else "fc", rope_theta=theta,
                           window_size=window, full_attention_layers=full,
                           **_preprocessor(d, patch, merge, frames))
    except KeyError as e:
        raise CheckpointError(f"{mt} config.json: vision_config lacks required key {e.args[0]!r}") from None
    if width % cfg.num_heads or (width // cfg.num_heads) % 4:
        raise CheckpointError(f"{mt}: vision head width {width}/{cfg.num_heads} is not a multiple of 4 (rows and "
                              "columns each rotate half of it)")
    token = c.get("image_token_id")
    if token is None:
        raise CheckpointError(f"{mt} config.json lacks image_token_id")
    return cfg, int(token)


def _preprocessor(d: Path, patch: int, merge: int, frames: int) -> dict:
    p = read_preprocessor(d)
    f = d / PREPROCESSOR
    check_standard_steps(p, d)
    if p.get("do_resize") is False:
        raise CheckpointError(f"{f}: do_resize=false is not supported (images are resized to whole patches)")
    for key, want in (("patch_size", patch), ("merge_size", merge), ("temporal_patch_size", frames)):
        if key in p and int(p[key]) != want:
            raise CheckpointError(f"{f}: {key}={p[key]} does not match the vision tower's {want}")
    size = p.get("size") or {}
    lo = p.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
    hi = p.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
    if not 0 < int(lo) <= int(hi):
        raise CheckpointError(f"{f}: min_pixels={lo} / max_pixels={hi} is not a range")
    return {"image_mean": tuple(p.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            "image_std": tuple(p.get("image_std", (0.26862954, 0.26130258, 0.27577711))), "resize": "smart",
            "resample": resample(p, "bicubic"), "min_pixels": int(lo), "max_pixels": int(hi)}


def split_state(hf: dict[str, torch.Tensor], vision: VisionConfig) -> tuple[dict, dict]:
    """(the text model's tensors under the names hf.py reads, OmniModel's vision.* tensors)."""
    text, out = {}, {}
    for name, t in hf.items():
        if m := _VISUAL.match(name):
            out.update(_vision_tensor(m[1], t, vision))
        else:  # transformers 5 keeps the LM under model.language_model.; hub files under model.
            text[_TEXT.sub("model.", name)] = t
    return text, out


def _vision_tensor(name: str, t: torch.Tensor, vision: VisionConfig) -> dict:
    if name == "patch_embed.proj.weight":  # Conv3d over exactly one (frames, patch, patch) patch: a matrix
        return {"vision.patch_embed.weight": t.reshape(t.shape[0], -1)}
    if m := _BLOCK.match(name):
        if int(m[1]) >= vision.num_layers:
            raise CheckpointError(f"unexpected vision tensor {name!r}: the tower has {vision.num_layers} blocks")
        return {f"vision.blocks.{m[1]}.{m[2]}.{m[3]}": t}
    base, _, kind = name.rpartition(".")
    if base in _MERGER:
        return {f"vision.{_MERGER[base]}.{kind}": t}
    raise CheckpointError(f"unexpected vision tensor 'visual.{name}' (no omnimini equivalent)")
