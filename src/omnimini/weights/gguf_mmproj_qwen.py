"""llama.cpp `mmproj` files of Qwen2-VL / Qwen2.5-VL (projector types "qwen2vl_merger", "qwen2.5vl_merger") ->
the same native-resolution tower hf_qwen2vl.py loads (VisionConfig tower="qwen2vl", model/qwen_vision.py).

llama.cpp's converter (Qwen2VLVisionModel in convert_hf_to_gguf.py) writes the tower as:
- `v.patch_embd.weight` and `v.patch_embd.weight.1`: the Conv3d patch embedding cut along its two temporal
  frames into two [D, 3, p, p] kernels (clip.cpp adds the two convolutions of the same still image). Stacked back
  on the frame axis they are the Conv3d, which QwenVisionEncoder applies as one matrix over (channel, frame, row,
  column): the same numbers in the same order.
- `v.blk.N.attn_{q,k,v}`: the fused qkv split in three (concatenated again here), `attn_out`, `ln1` / `ln2`;
  Qwen2-VL's MLP as `ffn_up` (fc1) / `ffn_down` (fc2), Qwen2.5-VL's SwiGLU as `ffn_gate` / `ffn_up` / `ffn_down`.
- `v.post_ln`: the merger's norm (ln_q, before the merge), `mm.0` / `mm.2`: the merger's Linear-GELU-Linear.

Metadata as clip.cpp reads it: LayerNorm blocks and quick-GELU for Qwen2-VL, RMSNorm and `clip.use_silu` for
Qwen2.5-VL; merge size `clip.vision.spatial_merge_size` (default 2); for Qwen2.5-VL, `clip.vision.n_wa_pattern`
(every n-th layer sees the whole image, the others their window) and the window of 112 px that clip.cpp fixes
(every released Qwen2.5-VL's window_size) unless the file has `clip.vision.window_size`. Rotary base 10000 (clip.cpp's
constant, the checkpoints' too). Images are resized as Qwen2-VL's processor does (smart_resize, bicubic, the
file's mean / std) between `clip.vision.image_{min,max}_pixels`, or clip.cpp's limits for these projectors,
8 .. 4096 LM tokens, where the file has none (the converter writes none: transformers' default is 1280 tokens, so
a large image can give more tokens here than through the HF checkpoint, as it does in llama.cpp).
"""

from __future__ import annotations

import re

import torch

from omnimini.config import VisionConfig
from omnimini.weights.gguf_loader import GGUFError

QWEN_PROJECTORS = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl"}
WINDOW_PX = 112  # clip.cpp's fixed Qwen2.5-VL attention window
MIN_TOKENS, MAX_TOKENS = 8, 4096  # clip.cpp's image token limits for these projectors
ROPE_THETA = 10000.0
_BLK = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = {"v.post_ln": "merge_norm", "mm.0": "proj_fc1", "mm.2": "proj_fc2"}


def read_qwen_mmproj(meta: dict, w: dict[str, torch.Tensor], kind: str, lm_hidden: int,
                     path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(VisionConfig, OmniModel vision.* tensors) of a Qwen2-VL / Qwen2.5-VL mmproj file; `w` its tensors in
    PyTorch layout. The file's width checks come first, each naming both sizes."""
    v25 = kind == "qwen2.5vl_merger"
    patch, hidden = int(meta["clip.vision.patch_size"]), int(meta["clip.vision.embedding_length"])
    n_layer = int(meta["clip.vision.block_count"])
    heads = int(meta.get("clip.vision.attention.head_count", 0))
    merge = int(meta.get("clip.vision.spatial_merge_size", 2))
    if "v.patch_embd.weight.1" not in w:
        raise GGUFError(f"{path}: {kind} mmproj file lacks v.patch_embd.weight.1 (the Conv3d's second frame)")
    if tuple(w["v.patch_embd.weight.1"].shape) != tuple(w["v.patch_embd.weight"].shape):
        raise GGUFError(f"{path}: patch size mismatch: v.patch_embd.weight is {list(w['v.patch_embd.weight'].shape)} "
                        f"but v.patch_embd.weight.1 is {list(w['v.patch_embd.weight.1'].shape)}")
    for name in ("mm.0.weight", "mm.2.weight", "v.post_ln.weight"):
        if name not in w:
            raise GGUFError(f"{path}: {kind} mmproj file lacks tensor {name}")
    merged = hidden * merge * merge
    if w["mm.0.weight"].shape[1] != merged:
        raise GGUFError(f"{path}: hidden size mismatch: the merger mm.0 takes {w['mm.0.weight'].shape[1]} features "
                        f"but the tower's embedding_length {hidden} x spatial_merge_size {merge} squared is {merged}")
    if w["mm.2.weight"].shape[0] != lm_hidden:
        raise GGUFError(f"{path}: hidden size mismatch: the mmproj gives {w['mm.2.weight'].shape[0]}-wide image "
                        f"tokens but the language model's hidden size is {lm_hidden}")
    if not heads or hidden % heads or (hidden // heads) % 4:
        raise GGUFError(f"{path}: vision head count {heads} does not split embedding_length {hidden} into heads "
                        "whose width is a multiple of 4 (rows and columns each rotate half)")
    gated = "v.blk.0.ffn_gate.weight" in w
    if gated != v25:
        raise GGUFError(f"{path}: projector type {kind} but the blocks {'have' if gated else 'lack'} ffn_gate")
    window, full = 0, ()
    if v25:
        if "clip.vision.n_wa_pattern" not in meta:
            raise GGUFError(f"{path}: {kind} mmproj file lacks clip.vision.n_wa_pattern")
        n = int(meta["clip.vision.n_wa_pattern"])
        if n < 1:
            raise GGUFError(f"{path}: clip.vision.n_wa_pattern {n} must be at least 1")
        # clip.cpp: layer il attends over the whole image when (il + 1) % n_wa_pattern == 0
        full = tuple(i for i in range(n_layer) if (i + 1) % n == 0)
        window = int(meta.get("clip.vision.window_size", WINDOW_PX))
        if window % (patch * merge):
            raise GGUFError(f"{path}: attention window {window} px is not a multiple of patch_size x merge "
                            f"({patch * merge})")
    act = "silu" if meta.get("clip.use_silu") else "gelu" if meta.get("clip.use_gelu") else "quick_gelu"
    unit = (patch * merge) ** 2
    lo = int(meta.get("clip.vision.image_min_pixels", MIN_TOKENS * unit))
    hi = int(meta.get("clip.vision.image_max_pixels", MAX_TOKENS * unit))
    if not 0 < lo <= hi:
        raise GGUFError(f"{path}: image_min_pixels={lo} / image_max_pixels={hi} is not a range")
    ffn = w.get("v.blk.0.ffn_up.weight")
    if ffn is None:
        raise GGUFError(f"{path}: mmproj file lacks tensor v.blk.0.ffn_up.weight")
    cfg = VisionConfig(
        image_size=patch * merge, patch_size=patch, hidden_size=hidden, num_layers=n_layer, num_heads=heads,
        # the converter writes Qwen2-VL's feed_forward_length from the LM width: the MLP's own is its tensor's
        intermediate_size=int(ffn.shape[0]), pixel_shuffle=merge, max_grid=1, class_token=False, positions="1d",
        pre_norm=False, final_norm=False, act=act,
        norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)), projector="qwen2vl",
        image_prompt="qwen2vl", tower="qwen2vl", temporal_patch=2, norm="rms" if v25 else "layer",
        mlp="gated" if v25 else "fc", rope_theta=ROPE_THETA, window_size=window, full_attention_layers=full,
        image_mean=tuple(float(x) for x in meta.get("clip.vision.image_mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=tuple(float(x) for x in meta.get("clip.vision.image_std", (0.26862954, 0.26130258, 0.27577711))),
        resize="smart", resample="bicubic", min_pixels=lo, max_pixels=hi)
    return cfg, _state(w, cfg, path)


def _state(w: dict[str, torch.Tensor], cfg: VisionConfig, path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    mlp = ({"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"} if cfg.mlp == "gated"
           else {"ffn_up": "fc1", "ffn_down": "fc2"})
    names = {"ln1": "norm1", "ln2": "norm2", "attn_out": "proj", **mlp}
    for name, t in w.items():
        if name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            continue
        base, _, kind = name.rpartition(".")
        if base in _TOP:
            out[f"vision.{_TOP[base]}.{kind}"] = t
        elif (m := _BLK.match(name)) and int(m[1]) < cfg.num_layers:
            blocks.setdefault(int(m[1]), {})[f"{m[2]}.{m[3]}"] = t
        else:
            raise GGUFError(f"{path}: unexpected mmproj tensor {name!r} (no omnimini equivalent)")
    # frames on axis 2, as the Conv3d kernel [D, 3, frames, p, p] before llama.cpp's converter sliced it
    conv = torch.stack([w["v.patch_embd.weight"], w["v.patch_embd.weight.1"]], dim=2)
    out["vision.patch_embed.weight"] = conv.reshape(conv.shape[0], -1)
    for i in range(cfg.num_layers):
        parts = blocks.get(i, {})
        need = [f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")]
        if missing := [n for n in need if n not in parts]:
            raise GGUFError(f"{path}: mmproj layer {i} lacks tensor v.blk.{i}.{missing[0]}")
        for k in ("weight", "bias"):
            out[f"vision.blocks.{i}.qkv.{k}"] = torch.cat([parts.pop(f"attn_{p}.{k}") for p in "qkv"])
        for key, t in parts.items():
            src, kind = key.split(".")
            if src not in names:
                raise GGUFError(f"{path}: unexpected mmproj tensor v.blk.{i}.{key} (no omnimini equivalent)")
            out[f"vision.blocks.{i}.{names[src]}.{kind}"] = t
    return out
