"""LLaVA checkpoints (CLIP vision tower + MLP projector + a text model hf.py reads) -> OmniModel.

LLaVA reads the tower's hidden states of layer `vision_feature_layer` (-2: the second to last), before the final
LayerNorm, drops the class token ("default" strategy), and maps each patch through Linear-GELU-Linear; those
tokens replace the `<image>` placeholders of the prompt. So the tower is loaded only up to that layer, into
OmniModel's vision encoder with its CLIP options (class token, 1D positions, pre-norm, quick GELU, no final norm,
"mlp" projector). The image preprocessing (shortest side, centre crop, CLIP mean/std) comes from
preprocessor_config.json, which must be there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omnimini.config import VisionConfig
from omnimini.weights.checkpoint import CheckpointError

PREPROCESSOR = "preprocessor_config.json"
_TOWER = re.compile(r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")
_PROJ = re.compile(r"(?:model\.)?multi_modal_projector\.linear_([12])\.(weight|bias)$")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_BLOCK = {"self_attn.out_proj": "proj", "layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "fc1",
          "mlp.fc2": "fc2"}


def text_config(c: dict) -> dict:
    return c.get("text_config") or {}


def vision_config(c: dict, d: Path) -> tuple[VisionConfig, int]:
    """(VisionConfig, image_token_id) of a LLaVA config.json and its directory's preprocessor_config.json."""
    v = c.get("vision_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"llava: vision tower {v.get('model_type')!r} is not supported (supported: "
                              "clip_vision_model)")
    layer = c.get("vision_feature_layer", -2)
    strategy = c.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or strategy != "default":
        raise CheckpointError(f"llava: vision_feature_layer={layer!r} / select strategy {strategy!r} is not "
                              "supported (supported: one layer, 'default')")
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"llava: projector_hidden_act {c['projector_hidden_act']!r} is not supported (gelu)")
    if v.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"llava: vision hidden_act {v['hidden_act']!r} is not supported (quick_gelu, gelu)")
    n = int(v.get("num_hidden_layers", 24))
    keep = n + 1 + layer if layer < 0 else layer  # hidden_states[0] is the embeddings
    pre = _preprocessor(d, int(v.get("image_size", 224)))
    size, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 14))
    cfg = VisionConfig(image_size=size, patch_size=patch, hidden_size=int(v["hidden_size"]), num_layers=keep,
                       num_heads=int(v["num_attention_heads"]), intermediate_size=int(v["intermediate_size"]),
                       pixel_shuffle=1, max_grid=size // patch, class_token=True, positions="1d", pre_norm=True,
                       final_norm=False, act=v.get("hidden_act", "quick_gelu"),
                       norm_eps=float(v.get("layer_norm_eps", 1e-5)), projector="mlp", **pre)
    token = c.get("image_token_id", c.get("image_token_index"))
    if token is None:
        raise CheckpointError("llava config.json lacks image_token_id")
    return cfg, int(token)


def read_preprocessor(d: Path) -> dict:
    """The directory's preprocessor_config.json (a VLM's image preprocessing), which must be there."""
    f = d / PREPROCESSOR
    if not f.is_file():
        raise CheckpointError(f"{d}: missing {PREPROCESSOR} (a vision-language checkpoint needs its image "
                              "preprocessing)")
    try:
        p = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(p, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    return p


# PIL's filter numbers, as image processors save `resample`
RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL filter numbers in preprocessor configs


def check_standard_steps(p: dict, d: Path) -> None:
    """The preprocessing steps omnimini always applies (RGB, rescale by 1/255, normalise) must not be switched off
    or changed in preprocessor config `p` of directory `d` (SigLIP families: Idefics3, Gemma 3)."""
    f = d / PREPROCESSOR
    for key in ("do_rescale", "do_normalize", "do_convert_rgb"):
        if p.get(key) is False:
            raise CheckpointError(f"{f}: {key}=false is not supported")
    if abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{f}: rescale_factor={p['rescale_factor']} is not supported (1/255)")


def resample(p: dict, default: str) -> str:
    r = p.get("resample")
    if r is None:
        return default
    if r not in RESAMPLE:
        raise CheckpointError(f"{PREPROCESSOR}: resample={r!r} is not supported (supported: "
                              f"{', '.join(f'{k} ({v})' for k, v in RESAMPLE.items())})")
    return RESAMPLE[r]


def _preprocessor(d: Path, image_size: int) -> dict:
    p = read_preprocessor(d)
    size = p.get("crop_size") or p.get("size") or {}
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if side is not None and int(side) != image_size:
        raise CheckpointError(f"{d / PREPROCESSOR}: images of {side} px do not fit a tower built for {image_size} px")
    return {"image_mean": tuple(p.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            "image_std": tuple(p.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            "resize": "crop" if p.get("do_center_crop", True) else "square", "resample": resample(p, "bicubic")}


def split_state(hf: dict[str, torch.Tensor], vision: VisionConfig) -> tuple[dict, dict]:
    """(the text model's tensors under the names hf.py reads, OmniModel's vision.* tensors)."""
    text, tower, out = {}, {}, {}
    for name, t in hf.items():
        if m := _PROJ.match(name):
            out[f"vision.proj_fc{m[1]}.{m[2]}"] = t
        elif m := _TOWER.match(name):
            tower[m[1]] = t
        else:  # transformers 5 keeps the LM under model.language_model.; older files under language_model.
            name = re.sub(r"^(?:model\.language_model\.|language_model\.model\.)", "model.", name)
            text[re.sub(r"^language_model\.lm_head\.", "lm_head.", name)] = t
    out.update(tower_state(tower, vision))
    return text, out


def tower_state(tower: dict[str, torch.Tensor], vision: VisionConfig, pos_ids: torch.Tensor | None = None) -> dict:
    """A CLIP / SigLIP vision tower's tensors (names below vision_model.) -> OmniModel's vision.* tensors. Layers
    past vision.num_layers are dropped (LLaVA reads a hidden layer); the final LayerNorm is kept only when the
    encoder applies one. pos_ids: which learned position each patch reads (default: patch i reads position i)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict] = {}
    for name, t in tower.items():
        if name == "embeddings.position_ids":
            continue  # a buffer
        if name.startswith("post_layernorm."):
            if vision.final_norm:
                out["vision.norm." + name.split(".")[-1]] = t
        elif name == "embeddings.class_embedding":
            out["vision.class_token"] = t
        elif name == "embeddings.patch_embedding.weight":  # a stride-p conv is a linear map of each patch
            out["vision.patch_embed.weight"] = t.reshape(t.shape[0], -1)
            out.setdefault("vision.patch_embed.bias", torch.zeros(t.shape[0], dtype=t.dtype))
        elif name == "embeddings.patch_embedding.bias":
            out["vision.patch_embed.bias"] = t
        elif name == "embeddings.position_embedding.weight":
            out["vision.pos"] = t if pos_ids is None else t[pos_ids]
        elif name.startswith("pre_layrnorm."):
            out["vision.pre_norm." + name.split(".")[-1]] = t
        elif m := _LAYER.match(name):
            i, rest = int(m[1]), m[2]
            if i >= vision.num_layers:
                continue  # after the layer LLaVA reads
            base, kind = rest.rsplit(".", 1)
            if base in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(i, {})[base[10], kind] = t
            elif base in _BLOCK:
                out[f"vision.blocks.{i}.{_BLOCK[base]}.{kind}"] = t
            else:
                raise CheckpointError(f"unexpected vision tensor {name!r} (no omnimini equivalent)")
        else:
            raise CheckpointError(f"unexpected vision tensor {name!r} (no omnimini equivalent)")
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            missing = [p for p in "qkv" if (p, kind) not in parts]
            if missing:
                raise CheckpointError(f"missing vision tensor: layer {i} {missing[0]}_proj.{kind}")
            out[f"vision.blocks.{i}.qkv.{kind}"] = torch.cat([parts[p, kind] for p in "qkv"])
    return out
