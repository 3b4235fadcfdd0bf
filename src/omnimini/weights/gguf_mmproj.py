"""llama.cpp `mmproj` GGUF files (a CLIP vision tower + LLaVA's MLP projector) -> OmniModel's vision encoder.

llama.cpp keeps a LLaVA model in two files: the language model (any GGUF architecture omnimini reads) and an
`mmproj` file of architecture `clip` holding the tower under `v.*` (v.patch_embd, v.class_embd, v.position_embd,
v.pre_ln, v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}, v.post_ln) and the projector under
`mm.0` / `mm.2` (Linear-GELU-Linear). The tower is read as clip.cpp reads it for projector type "mlp": hidden
state `clip.vision.feature_layer` (0 = the embeddings) or, without that key, the second to last one; the final
norm only if the file has one and the whole tower is read; class token dropped. Files from llama.cpp's legacy
converter call fc1 `ffn_down` and fc2 `ffn_up`; as clip.cpp does, the pair is told apart by shape. Images are
prepared as the Hugging Face LLaVA processor does (shortest side, centre crop, bicubic) with the file's mean / std.
The image placeholder is the language model's `<image>` token, which its vocabulary must have.

Projector type "gemma3" (Gemma 3's SigLIP tower): the whole tower with its final norm, then the average of each
k x k block of patches (k = `clip.vision.projector.scale_factor`, clip.cpp's default 4), `mm.soft_emb_norm` (stored
as 1 + w by the converter) and `mm.input_projection` (Hugging Face's [vision, text] layout, applied as x @ W); images
stretched to the tower's square (bilinear); the LM's `<start_of_image>` framing with `<image_soft_token>`
placeholders, which attend to each other both ways (Gemma3Processor / hf_gemma3.py).

Projector type "idefics3" (Idefics3 / SmolVLM): the whole SigLIP tower with its final norm, the pixel shuffle of
each k x k block of patches (k = `clip.vision.projector.scale_factor`, else read off the projector's width) and the
bias-free `mm.model.fc`. With `clip.vision.preproc_image_size` (what llama.cpp's converter writes from the
processor's size.longest_edge) images are resized to that longest edge and cut into tiles of the tower's size plus
the whole image, each tile framed by `<fake_token_around_image>` and `<row_r_col_c>` / `<global-img>`, as mtmd and
Idefics3Processor do; without it, one whole-image tile (older llama.cpp). Lanczos resampling, as the processor the
model was trained with. Positions are read as stored, one per patch (llama.cpp's reading; transformers' bucketing,
hf_idefics3.position_ids, is the identity at the grids real checkpoints use).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from omnimini.config import VisionConfig
from omnimini.weights.gguf_loader import GGUFError, dequantize, metadata, open_gguf
from omnimini.weights.gguf_mmproj_qwen import QWEN_PROJECTORS, read_qwen_mmproj

PROJECTOR_TYPES = ("mlp", "gemma3", "idefics3", *QWEN_PROJECTORS)
IMAGE_TOKEN = "<image>"
QWEN_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")  # placeholder, then the template's frame
GEMMA_SOFT_TOKEN = "<image_soft_token>"
_BLK = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
_BLOCK = {"attn_out": "proj", "ln1": "norm1", "ln2": "norm2"}
_TOP = {"v.patch_embd.bias": "vision.patch_embed.bias", "v.class_embd": "vision.class_token",
        "v.position_embd.weight": "vision.pos", "v.pre_ln.weight": "vision.pre_norm.weight",
        "v.pre_ln.bias": "vision.pre_norm.bias", "v.post_ln.weight": "vision.norm.weight",
        "v.post_ln.bias": "vision.norm.bias", "mm.0.weight": "vision.proj_fc1.weight",
        "mm.0.bias": "vision.proj_fc1.bias", "mm.2.weight": "vision.proj_fc2.weight",
        "mm.2.bias": "vision.proj_fc2.bias", "mm.soft_emb_norm.weight": "vision.pool_norm.weight"}


def _need(meta: dict, key: str, path):
    if key not in meta:
        raise GGUFError(f"{path}: mmproj file lacks {key}")
    return meta[key]


def read_mmproj(path, lm_hidden: int) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(VisionConfig, OmniModel vision.* tensors) of an mmproj file for a language model of width lm_hidden."""
    reader = open_gguf(path)
    meta = metadata(reader)
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder", True):
        raise GGUFError(f"{path}: not an mmproj file (architecture {meta.get('general.architecture')!r}, "
                        "expected 'clip' with a vision encoder)")
    kind = meta.get("clip.projector_type", "mlp" if meta.get("clip.has_llava_projector") else None)
    if kind not in PROJECTOR_TYPES:
        raise GGUFError(f"{path}: mmproj projector type {kind!r} is not supported (supported: "
                        f"{', '.join(PROJECTOR_TYPES)}, LLaVA's MLP)")
    raw = {t.name: t for t in reader.tensors}
    w = {name: torch.from_numpy(np.ascontiguousarray(dequantize(t))) for name, t in raw.items()}
    size, patch = int(_need(meta, "clip.vision.image_size", path)), int(_need(meta, "clip.vision.patch_size", path))
    hidden = int(_need(meta, "clip.vision.embedding_length", path))
    n_layer = int(_need(meta, "clip.vision.block_count", path))
    embd = w.get("v.patch_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: mmproj file lacks tensor v.patch_embd.weight")
    if embd.dim() != 4 or tuple(embd.shape[1:]) != (3, patch, patch) or embd.shape[0] != hidden:
        raise GGUFError(f"{path}: patch size mismatch: clip.vision.patch_size={patch} and embedding_length={hidden} "
                        f"but v.patch_embd.weight is {list(embd.shape)} (expected [{hidden}, 3, {patch}, {patch}])")
    if size % patch:
        raise GGUFError(f"{path}: patch size mismatch: image_size {size} is not a multiple of patch_size {patch}")
    if kind in QWEN_PROJECTORS:
        return read_qwen_mmproj(meta, w, kind, lm_hidden, path)
    if kind == "gemma3":
        return _gemma3(meta, w, size, patch, hidden, n_layer, lm_hidden, path)
    if kind == "idefics3":
        return _idefics3(meta, w, size, patch, hidden, n_layer, lm_hidden, path)
    if "mm.2.weight" not in w or "mm.0.weight" not in w:
        raise GGUFError(f"{path}: mmproj file lacks the projector tensors mm.0 / mm.2")
    if w["mm.0.weight"].shape[1] != hidden:
        raise GGUFError(f"{path}: hidden size mismatch: the projector mm.0 takes {w['mm.0.weight'].shape[1]} "
                        f"features but the tower's embedding_length is {hidden}")
    if w["mm.2.weight"].shape[0] != lm_hidden:
        raise GGUFError(f"{path}: hidden size mismatch: the projector gives {w['mm.2.weight'].shape[0]}-wide image "
                        f"tokens but the language model's hidden size is {lm_hidden}")
    grid = size // patch
    cls = "v.class_embd" in w
    if "v.position_embd.weight" not in w or w["v.position_embd.weight"].shape[0] != grid * grid + cls:
        have = list(w["v.position_embd.weight"].shape) if "v.position_embd.weight" in w else None
        raise GGUFError(f"{path}: patch size mismatch: a {size} px image in {patch} px patches has {grid * grid} "
                        f"patches (+{int(cls)} class token) but v.position_embd.weight is {have}")
    # clip.cpp: hidden_states[k] (k layers run) for the deepest feature layer; the second to last by default
    layers = [int(x) for x in meta.get("clip.vision.feature_layer", [])]
    if len(layers) > 1:
        raise GGUFError(f"{path}: several feature layers {layers} (stacked features) are not supported")
    keep = layers[0] if layers else n_layer - 1
    if not 1 <= keep <= n_layer:
        raise GGUFError(f"{path}: feature layer {keep} is outside the tower's {n_layer} layers")
    final_norm = keep == n_layer and "v.post_ln.weight" in w
    inter = int(meta.get("clip.vision.feed_forward_length", 0))
    cfg = VisionConfig(
        image_size=size, patch_size=patch, hidden_size=hidden, num_layers=keep,
        num_heads=int(_need(meta, "clip.vision.attention.head_count", path)),
        intermediate_size=inter or _ffn_width(w, hidden), pixel_shuffle=1, max_grid=grid, class_token=cls,
        positions="1d", pre_norm="v.pre_ln.weight" in w, final_norm=final_norm,
        act="gelu" if meta.get("clip.use_gelu", False) else "quick_gelu",
        norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-5)), projector="mlp",
        image_mean=tuple(float(x) for x in meta.get("clip.vision.image_mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=tuple(float(x) for x in meta.get("clip.vision.image_std", (0.26862954, 0.26130258, 0.27577711))),
        resize="crop", resample="bicubic")
    return cfg, _state(w, cfg, path)


def _gemma3(meta, w, size, patch, hidden, n_layer, lm_hidden, path) -> tuple[VisionConfig, dict]:
    grid, scale = size // patch, int(meta.get("clip.vision.projector.scale_factor", 4))
    proj = w.get("mm.input_projection.weight")
    if proj is None or "mm.soft_emb_norm.weight" not in w:
        raise GGUFError(f"{path}: mmproj file lacks the gemma3 projector tensors mm.input_projection / "
                        "mm.soft_emb_norm")
    if tuple(proj.shape) != (hidden, lm_hidden):
        raise GGUFError(f"{path}: hidden size mismatch: mm.input_projection.weight is {list(proj.shape)}, expected "
                        f"[{hidden} (the tower), {lm_hidden} (the language model)]")
    if grid % scale:
        raise GGUFError(f"{path}: a {grid} x {grid} patch grid does not pool by scale_factor {scale}")
    cfg = _siglip(meta, w, size, patch, hidden, n_layer, path, pixel_shuffle=scale, projector="gemma3",
                  resize="square", resample="bilinear", image_prompt="gemma3")
    state = _state({k: v for k, v in w.items() if k != "mm.input_projection.weight"}, cfg, path)
    state["vision.proj_fc1.weight"] = proj.t().contiguous()
    return cfg, state


def _siglip(meta, w, size, patch, hidden, n_layer, path, **kw) -> VisionConfig:
    """The SigLIP tower both Gemma 3 and Idefics3 files hold: every layer, the final norm, no class token, one
    learned position per patch, tanh-GELU (ggml's gelu) MLPs."""
    grid = size // patch
    if "v.position_embd.weight" not in w or w["v.position_embd.weight"].shape[0] != grid * grid:
        raise GGUFError(f"{path}: patch size mismatch: {grid * grid} patches but v.position_embd.weight is "
                        f"{list(w['v.position_embd.weight'].shape) if 'v.position_embd.weight' in w else None}")
    return VisionConfig(
        image_size=size, patch_size=patch, hidden_size=hidden, num_layers=n_layer,
        num_heads=int(_need(meta, "clip.vision.attention.head_count", path)),
        intermediate_size=int(meta.get("clip.vision.feed_forward_length", 0)) or _ffn_width(w, hidden),
        max_grid=grid, class_token=False, positions="1d", pre_norm=False, final_norm="v.post_ln.weight" in w,
        act="gelu_tanh", norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        image_mean=tuple(float(x) for x in meta.get("clip.vision.image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(float(x) for x in meta.get("clip.vision.image_std", (0.5, 0.5, 0.5))), **kw)


def _idefics3(meta, w, size, patch, hidden, n_layer, lm_hidden, path) -> tuple[VisionConfig, dict]:
    fc = w.get("mm.model.fc.weight")
    if fc is None:
        raise GGUFError(f"{path}: mmproj file lacks the idefics3 projector tensor mm.model.fc.weight")
    if fc.shape[0] != lm_hidden:
        raise GGUFError(f"{path}: hidden size mismatch: mm.model.fc gives {fc.shape[0]}-wide image tokens but the "
                        f"language model's hidden size is {lm_hidden}")
    merged = fc.shape[1] / hidden  # the pixel shuffle stacks scale^2 patches into one token
    scale = int(meta.get("clip.vision.projector.scale_factor", round(merged ** 0.5)))
    if scale < 1 or scale * scale * hidden != fc.shape[1]:
        raise GGUFError(f"{path}: hidden size mismatch: mm.model.fc takes {fc.shape[1]} features, not the tower's "
                        f"{hidden} x scale_factor {scale} squared")
    grid = size // patch
    if grid % scale:
        raise GGUFError(f"{path}: a {grid} x {grid} patch grid does not pixel-shuffle by scale_factor {scale}")
    edge = meta.get("clip.vision.preproc_image_size")
    if edge is not None and int(edge) < size:
        raise GGUFError(f"{path}: clip.vision.preproc_image_size {edge} is smaller than the tower's image_size {size}")
    cfg = _siglip(meta, w, size, patch, hidden, n_layer, path, pixel_shuffle=scale, projector="linear",
                  image_prompt="idefics3", resize="tiles", resample="lanczos",
                  max_edge=int(edge) if edge is not None else size, split_images=edge is not None)
    state = _state({k: v for k, v in w.items() if k != "mm.model.fc.weight"}, cfg, path)
    state["vision.proj_fc1.weight"] = fc
    return cfg, state


def _ffn_width(w: dict, hidden: int) -> int:
    t = w.get("v.blk.0.ffn_up.weight")
    if t is None:
        raise GGUFError("mmproj file lacks v.blk.0.ffn_up.weight and clip.vision.feed_forward_length")
    return t.shape[0] if t.shape[1] == hidden else t.shape[1]


def _state(w: dict[str, torch.Tensor], cfg: VisionConfig, path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in w.items():
        if name == "v.patch_embd.weight":  # a stride-p conv is a linear map of each patch
            out["vision.patch_embed.weight"] = t.reshape(t.shape[0], -1)
            out.setdefault("vision.patch_embed.bias", torch.zeros(t.shape[0]))
        elif name in _TOP:
            if name.startswith("v.post_ln") and not cfg.final_norm:
                continue  # LLaVA reads a hidden layer before the final norm
            out[_TOP[name]] = t
        elif m := _BLK.match(name):
            i = int(m[1])
            if i < cfg.num_layers:
                blocks.setdefault(i, {})[f"{m[2]}.{m[3]}"] = t
        else:
            raise GGUFError(f"{path}: unexpected mmproj tensor {name!r} (no omnimini equivalent)")
    for i, parts in blocks.items():
        need = [f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")] + ["ffn_up.weight", "ffn_down.weight"]
        if missing := [n for n in need if n not in parts]:
            raise GGUFError(f"{path}: mmproj layer {i} lacks tensor v.blk.{i}.{missing[0]}")
        out[f"vision.blocks.{i}.qkv.weight"] = torch.cat([parts[f"attn_{p}.weight"] for p in "qkv"])
        out[f"vision.blocks.{i}.qkv.bias"] = torch.cat([parts[f"attn_{p}.bias"] for p in "qkv"])
        # fc1 maps the tower width to the MLP width; the legacy converter named it ffn_down
        legacy = parts["ffn_up.weight"].shape[1] != cfg.hidden_size
        first, second = ("ffn_down", "ffn_up") if legacy else ("ffn_up", "ffn_down")
        for src, dst in ((first, "fc1"), (second, "fc2")):
            out[f"vision.blocks.{i}.{dst}.weight"] = parts[f"{src}.weight"]
            if f"{src}.bias" in parts:
                out[f"vision.blocks.{i}.{dst}.bias"] = parts[f"{src}.bias"]
        for src, dst in _BLOCK.items():
            for kind in ("weight", "bias"):
                if f"{src}.{kind}" in parts:
                    out[f"vision.blocks.{i}.{dst}.{kind}"] = parts[f"{src}.{kind}"]
    return out


def attach_mmproj(model, tok, path):
    """Give a loaded language model the mmproj file's vision tower + projector (in place); returns model."""
    from omnimini.images import GEMMA_BOI, GEMMA_EOI
    from omnimini.model.vision import vision_tower

    cfg = model.config
    if cfg.vision is not None:
        raise GGUFError(f"--mmproj {path}: the model already has a vision encoder")
    vision, state = read_mmproj(path, cfg.hidden_size)
    gemma, qwen = vision.image_prompt == "gemma3", vision.tower == "qwen2vl"
    placeholder = GEMMA_SOFT_TOKEN if gemma else QWEN_TOKENS[0] if qwen else IMAGE_TOKEN
    if qwen and cfg.mrope_section is None:
        raise GGUFError(f"--mmproj {path}: a Qwen2-VL projector needs the qwen2vl language model (its M-RoPE "
                        f"rope.dimension_sections), not a {cfg.arch.removeprefix('gguf:')} one")
    for t in (placeholder, GEMMA_BOI, GEMMA_EOI) if gemma else QWEN_TOKENS if qwen else (placeholder,):
        if tok.token_to_id(t) is None:
            raise GGUFError(f"--mmproj {path}: the language model's vocabulary has no {t} token to "
                            f"{'frame' if t != placeholder else 'stand for'} the image in the prompt")
    if vision.image_prompt == "idefics3":
        from omnimini.weights.hf_idefics3 import check_tokenizer

        check_tokenizer(tok, vision, f"--mmproj {path}")
    image_id = tok.token_to_id(placeholder)
    encoder = vision_tower(vision, cfg.hidden_size)
    prefixed = {k.removeprefix("vision."): v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(prefixed, strict=False)
    if missing or unexpected:
        raise GGUFError(f"{path}: mmproj tensors do not fit the tower (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    norm = model.norm.weight  # encode_images casts pixels to this dtype (the embedding may hold quantized blocks)
    model.vision = encoder.to(device=norm.device, dtype=norm.dtype).eval()
    model.config = dataclasses.replace(cfg, vision=vision, image_token_id=image_id,
                                       image_attention="bidirectional" if gemma else cfg.image_attention)
    tok.image_token, tok.expand_image_token = placeholder, True  # the template writes one placeholder per image
    tok.image_placeholder = GEMMA_BOI if gemma else None  # Gemma's template writes <start_of_image>
    return model
