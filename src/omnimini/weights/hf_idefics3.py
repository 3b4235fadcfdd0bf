"""Idefics3 / SmolVLM checkpoints (SigLIP tower + pixel-shuffle connector + a Llama text model) -> OmniModel.

The tower is SigLIP (no class token, one learned position per patch, no pre-norm, tanh-GELU MLPs, a final
LayerNorm); the connector merges each scale_factor x scale_factor block of patches into one token (pixel shuffle)
and maps it with one bias-free Linear; those tokens replace the prompt's `<image>` tokens. Images are cut into
tiles of the tower's size plus the whole image as one more tile, each tile framed in the prompt by
`<fake_token_around_image>` and `<row_r_col_c>` / `<global-img>` (OmniModel's VisionConfig: projector="linear",
resize="tiles", image_prompt="idefics3"). The image preprocessing comes from preprocessor_config.json, which
must be there.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from omnimini.config import VisionConfig
from omnimini.images import FAKE_IMAGE, GLOBAL_IMAGE
from omnimini.weights.checkpoint import CheckpointError
from omnimini.weights.hf_llava import PREPROCESSOR, check_standard_steps, read_preprocessor, resample, tower_state

MODEL_TYPES = ("idefics3", "smolvlm")
_TOWERS = ("idefics3_vision", "smolvlm_vision")
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
_TOWER = re.compile(r"(?:model\.)?vision_model\.(.+)$")
_PROJ = re.compile(r"(?:model\.)?connector\.modality_projection\.proj\.weight$")
_TEXT = re.compile(r"^(?:model\.)?text_model\.")


def text_config(c: dict) -> dict:
    return c.get("text_config") or {}


def vision_config(c: dict, d: Path) -> tuple[VisionConfig, int]:
    """(VisionConfig, image_token_id) of an Idefics3 / SmolVLM config.json and its preprocessor_config.json."""
    mt = c.get("model_type")
    v = c.get("vision_config") or {}
    if v.get("model_type", _TOWERS[0]) not in _TOWERS:
        raise CheckpointError(f"{mt}: vision tower {v.get('model_type')!r} is not supported (supported: "
                              f"{', '.join(_TOWERS)})")
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTS:
        raise CheckpointError(f"{mt}: vision hidden_act {act!r} is not supported (supported: {', '.join(_ACTS)})")
    if int(v.get("num_channels", 3)) != 3:
        raise CheckpointError(f"{mt}: vision num_channels={v['num_channels']} is not supported (3)")
    size, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 32))
    scale = int(c.get("scale_factor", 2))
    if size % patch or (size // patch) % scale:
        raise CheckpointError(f"{mt}: a {size} px tile in {patch} px patches does not pixel-shuffle by "
                              f"scale_factor {scale}")
    try:
        cfg = VisionConfig(image_size=size, patch_size=patch, hidden_size=int(v["hidden_size"]),
                           num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
                           intermediate_size=int(v["intermediate_size"]), pixel_shuffle=scale,
                           max_grid=size // patch, class_token=False, positions="1d", pre_norm=False,
                           final_norm=True, act=_ACTS[act], norm_eps=float(v.get("layer_norm_eps", 1e-6)),
                           projector="linear", image_prompt="idefics3", **_preprocessor(d, size))
    except KeyError as e:
        raise CheckpointError(f"{mt} config.json: vision_config lacks required key {e.args[0]!r}") from None
    token = c.get("image_token_id")
    if token is None:
        raise CheckpointError(f"{mt} config.json lacks image_token_id")
    return cfg, int(token)


def _preprocessor(d: Path, tile: int) -> dict:
    p = read_preprocessor(d)
    f = d / PREPROCESSOR
    check_standard_steps(p, d)
    tile_edge = (p.get("max_image_size") or {}).get("longest_edge", tile)
    if int(tile_edge) != tile:
        raise CheckpointError(f"{f}: max_image_size.longest_edge={tile_edge} does not match the vision tower's "
                              f"image_size {tile} (each tile must be one tower image)")
    edge = (p.get("size") or {}).get("longest_edge", 4 * tile) if p.get("do_resize", True) else None
    if edge is not None and int(edge) < 1:
        raise CheckpointError(f"{f}: size.longest_edge={edge} is not a size")
    return {"image_mean": tuple(p.get("image_mean", (0.5, 0.5, 0.5))),
            "image_std": tuple(p.get("image_std", (0.5, 0.5, 0.5))), "resize": "tiles",
            "resample": resample(p, "lanczos"), "max_edge": None if edge is None else int(edge),
            "split_images": bool(p.get("do_image_splitting", True))}


def position_ids(n: int) -> torch.Tensor:
    """The learned position each patch of a full n x n tile reads, computed as transformers' Idefics3 embeddings
    do: float32 fractional coordinates bucketed against float32 boundaries. That is not always i (n = 19, 25, 29,
    ... repeat a position and skip the next), and the checkpoint was trained with what it computes."""
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    frac = torch.arange(n, dtype=torch.float32) * (1.0 / torch.tensor([n]))
    bucket = torch.bucketize(torch.clamp(frac, max=1.0 - 1e-6), boundaries, right=True)
    return (bucket[:, None] * n + bucket[None, :]).flatten()


def split_state(hf: dict[str, torch.Tensor], vision: VisionConfig) -> tuple[dict, dict]:
    """(the text model's tensors under the names hf.py reads, OmniModel's vision.* tensors)."""
    text, tower, out = {}, {}, {}
    for name, t in hf.items():
        if _PROJ.match(name):
            out["vision.proj_fc1.weight"] = t
        elif m := _TOWER.match(name):
            tower[m[1]] = t
        else:
            text[_TEXT.sub("model.", name)] = t
    out.update(tower_state(tower, vision, position_ids(vision.grid)))
    return text, out


def check_tokenizer(tok, vision: VisionConfig, where: str) -> None:
    """The framing tokens must be single tokens of the vocabulary; as text they would be split into pieces the
    model never saw around an image."""
    need = [FAKE_IMAGE, GLOBAL_IMAGE] + (["<row_1_col_1>"] if vision.split_images else [])
    missing = [t for t in need if tok.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks {', '.join(missing)} (Idefics3's image framing tokens)")
