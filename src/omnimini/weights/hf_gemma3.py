"""Gemma 3 vision-language checkpoints (SigLIP tower + pooling projector + the Gemma 3 text model) -> OmniModel.

The tower is SigLIP (one learned position per patch, a final LayerNorm; its attention-pooling head is unused);
the projector averages each k x k block of patches (k = patches per side / sqrt(mm_tokens_per_image)), applies
Gemma's (1 + w) RMSNorm and one bias-free matrix (VisionConfig projector="gemma3", pixel_shuffle=k). The image is
stretched to the tower's square (bilinear), and the template's <start_of_image> becomes
"\\n\\n<start_of_image>" + mm_tokens_per_image x <image_soft_token> + "<end_of_image>\\n\\n" (image_prompt="gemma3"),
as Gemma3Processor writes it; with do_pan_and_scan in preprocessor_config.json a wide or tall image adds crops, each
one more view (pan_and_scan.py). In the language model the soft tokens of one image attend to each other both ways
(ModelConfig.image_attention="bidirectional"); text stays causal.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from omnimini.config import VisionConfig
from omnimini.images import GEMMA_BOI, GEMMA_EOI
from omnimini.weights.checkpoint import CheckpointError
from omnimini.weights.hf_llava import PREPROCESSOR, check_standard_steps, read_preprocessor, resample, tower_state

MODEL_TYPES = ("gemma3",)
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
_TOWER = re.compile(r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")
_PROJ = re.compile(r"(?:model\.)?multi_modal_projector\.(mm_input_projection_weight|mm_soft_emb_norm\.weight)$")
_TEXT = re.compile(r"^(?:model\.)?language_model\.(?:model\.)?")


def text_config(c: dict) -> dict:
    return {"model_type": "gemma3_text", **(c.get("text_config") or {})}


def vision_config(c: dict, d: Path) -> tuple[VisionConfig, int]:
    """(VisionConfig, image_token_id) of a Gemma 3 config.json and its preprocessor_config.json."""
    v = c.get("vision_config") or {}
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"gemma3: vision tower {v.get('model_type')!r} is not supported (siglip_vision_model)")
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTS:
        raise CheckpointError(f"gemma3: vision hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
    size, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 16))
    side, tokens = size // patch, int(c.get("mm_tokens_per_image", 256))
    per_side = math.isqrt(tokens)
    if size % patch or per_side * per_side != tokens or side % per_side:
        raise CheckpointError(f"gemma3: {tokens} image tokens do not pool a {side} x {side} patch grid evenly")
    try:
        cfg = VisionConfig(image_size=size, patch_size=patch, hidden_size=int(v["hidden_size"]),
                           num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
                           intermediate_size=int(v["intermediate_size"]), pixel_shuffle=side // per_side,
                           max_grid=side, class_token=False, positions="1d", pre_norm=False, final_norm=True,
                           act=_ACTS[act], norm_eps=float(v.get("layer_norm_eps", 1e-6)), projector="gemma3",
                           image_prompt="gemma3", **_preprocessor(d, size))
    except KeyError as e:
        raise CheckpointError(f"gemma3 config.json: vision_config lacks required key {e.args[0]!r}") from None
    token = c.get("image_token_index", c.get("image_token_id"))
    if token is None:
        raise CheckpointError("gemma3 config.json lacks image_token_index")
    return cfg, int(token)


def _preprocessor(d: Path, image_size: int) -> dict:
    p = read_preprocessor(d)
    f = d / PREPROCESSOR
    check_standard_steps(p, d)
    pan = _pan_and_scan(p, f)
    size = p.get("size") or {}
    h, w = size.get("height", image_size), size.get("width", image_size)
    if (int(h), int(w)) != (image_size, image_size):
        raise CheckpointError(f"{f}: size {h}x{w} does not match the vision tower's {image_size} px")
    return {"image_mean": tuple(p.get("image_mean", (0.5, 0.5, 0.5))),
            "image_std": tuple(p.get("image_std", (0.5, 0.5, 0.5))), "resize": "square",
            "resample": resample(p, "bilinear"), **pan}


# Gemma3Processor's pan-and-scan defaults: hub preprocessor configs leave these keys null
PAN_DEFAULTS = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}


def _pan_and_scan(p: dict, f: Path) -> dict:
    """VisionConfig's pan-and-scan fields from preprocessor_config.json (off unless do_pan_and_scan is true)."""
    if not p.get("do_pan_and_scan"):
        return {}
    crop, crops, ratio = (p.get(k) if p.get(k) is not None else v for k, v in PAN_DEFAULTS.items())
    if int(crop) < 1 or int(crops) < 2 or float(ratio) <= 0:
        raise CheckpointError(f"{f}: pan-and-scan needs pan_and_scan_min_crop_size >= 1, "
                              f"pan_and_scan_max_num_crops >= 2 and a positive ratio (got {crop}, {crops}, {ratio})")
    return {"pan_and_scan": True, "pan_min_crop": int(crop), "pan_max_crops": int(crops),
            "pan_min_ratio": float(ratio)}


def split_state(hf: dict[str, torch.Tensor], vision: VisionConfig) -> tuple[dict, dict]:
    """(the text model's tensors under the names hf.py reads, OmniModel's vision.* tensors)."""
    text, tower, out = {}, {}, {}
    for name, t in hf.items():
        if m := _PROJ.match(name):
            if m[1] == "mm_input_projection_weight":  # [vision, text], applied as x @ W
                out["vision.proj_fc1.weight"] = t.t().contiguous()
            else:
                out["vision.pool_norm.weight"] = 1.0 + t.float()  # Gemma's norms scale by (1 + w)
        elif m := _TOWER.match(name):
            if not m[1].startswith("head."):  # SigLIP's pooling head: Gemma 3 reads the patch tokens
                tower[m[1]] = t
        else:
            text[_TEXT.sub("model.", name)] = t
    out.update(tower_state(tower, vision))
    return text, out


def check_tokenizer(tok, where: str) -> None:
    missing = [t for t in (GEMMA_BOI, GEMMA_EOI) if tok.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks {', '.join(missing)} (Gemma 3's image framing tokens)")
