"""What omnimini-vl is: the text model's weights untouched, plus a vision encoder + projector and image markers.

The LM is never trained here, so a text-only request computes exactly what the text model computes (same
weights, same template text), and the vision weights are a small file of their own (shipped in the package).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from omnimini.config import ModelConfig, VisionConfig

VL_NAME = "omnimini-vl"
# 128 px in 16 px patches -> an 8 x 8 grid, pixel-shuffled 2 x 2 into 16 LM tokens: each token sees a 32 px cell.
# 16 tokens keep a frozen 135M LM's backward affordable on 2 CPU cores (the LM's compute is ~95% of a step).
VISION = VisionConfig(image_size=128, patch_size=16, hidden_size=192, num_layers=4, num_heads=3,
                      intermediate_size=768, pixel_shuffle=2, max_grid=8, center_tokens=False,
                      token_scale=0.136)  # SmolLM2-135M's token-embedding RMS
# SmolLM2's vocabulary has no image tokens; these special tokens (code-notebook markers, never produced in chat)
# stand in, so the vocabulary and the tied output head stay exactly the text model's.
IMAGE_START, IMAGE_TOKEN, IMAGE_END = "<jupyter_start>", "<jupyter_text>", "<jupyter_output>"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
VISION_FILE = ASSET_DIR / "omnimini-vl-vision.safetensors"

_CONTENT_MACRO = (
    "{% macro vl_content(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for part in content %}{% if part.type == 'text' %}{{ part.text }}"
    "{% else %}{{ image_start }}{{ image_token * image_tokens }}{{ image_end }}{% endif %}{% endfor %}"
    "{% endif %}{% endmacro %}"
)


class VisionWeightsError(ValueError):
    """The shipped vision weight file is missing, corrupt or does not fit the model."""


def vl_template(text_template: str) -> str:
    """The text model's chat template with list contents (text + image parts) rendered; string contents render
    character for character as before, which is what keeps text-only prompts identical."""
    if "message['content']" not in text_template:
        raise ValueError("the text model's chat template does not render message['content']; cannot add images")
    return _CONTENT_MACRO + text_template.replace("message['content']", "vl_content(message['content'])")


def vl_tokenizer(text_tok):
    from omnimini.tokenizer import Tokenizer

    for t in (IMAGE_START, IMAGE_TOKEN, IMAGE_END):
        if text_tok.token_to_id(t) is None:
            raise ValueError(f"the text model's vocabulary lacks {t!r}, which omnimini-vl uses as an image marker")
    return Tokenizer(text_tok.hf, chat_template=vl_template(text_tok.chat_template), eos_tokens=text_tok.eos_tokens,
                     bos_token=text_tok.bos_token, pad_token=text_tok.pad_token, image_token=IMAGE_TOKEN,
                     image_start=IMAGE_START, image_end=IMAGE_END)


ADAPTER_DIM = 128  # image adapter width per block (model.ImageAdapter): 4.4M parameters over 30 blocks


def vl_config(text_cfg: ModelConfig, tok) -> ModelConfig:
    return replace(text_cfg, vision=replace(VISION), image_token_id=tok.image_token_id, image_adapter_dim=ADAPTER_DIM)


def is_vl_tensor(name: str) -> bool:
    """The tensors omnimini-vl adds to the text model: the vision encoder + projector and the image adapters."""
    return name.startswith("vision.") or ".image_adapter." in name


def attach_vision(text_model, tok, vl_state: dict | None = None, where: str = "vision weights",
                  in_place: bool = False):
    """An OmniModel with the text model's tensors plus a vision encoder and image adapters: freshly initialised,
    or from `vl_state` (the `is_vl_tensor` tensors, full names). A new model sharing the text model's tensors, or
    (in_place) the text model itself, e.g. one whose layers already hold GGUF blocks for the server."""
    from omnimini.model.model import ImageAdapter, OmniModel
    from omnimini.model.vision import VisionEncoder

    cfg = vl_config(text_model.config, tok)
    if in_place:
        model = text_model
    else:
        with torch.device("meta"):
            model = OmniModel(replace(cfg, vision=None, image_adapter_dim=0))
        model.load_state_dict(text_model.state_dict(), assign=True, strict=True)
        model.rotary.inv_freq = text_model.rotary.inv_freq
    model.config = cfg
    dtype = text_model.norm.weight.dtype  # (the embedding may hold quantized blocks)
    model.vision = VisionEncoder(cfg.vision, cfg.hidden_size)
    for blk in model.blocks:
        blk.image_adapter = ImageAdapter(cfg.hidden_size, cfg.image_adapter_dim, cfg.rms_norm_eps)
    fresh = [model.vision, *(blk.image_adapter for blk in model.blocks)]
    for m in fresh:
        m.apply(OmniModel._init)
    torch.nn.init.constant_(model.vision.proj_norm.weight, cfg.vision.token_scale)
    if vl_state is not None:
        expected = {k: v for k, v in model.state_dict().items() if is_vl_tensor(k)}
        bad = [k for k in expected if k not in vl_state or vl_state[k].shape != expected[k].shape]
        extra = [k for k in vl_state if k not in expected]
        if bad or extra:
            raise VisionWeightsError(f"{where}: does not fit omnimini-vl's vision encoder and adapters "
                                     f"({'mismatched ' + bad[0] if bad else 'unexpected ' + extra[0]})")
        model.load_state_dict(vl_state, strict=False)
    for m in fresh:
        m.to(dtype)
    return model.eval()


def read_vision_file(path: Path = VISION_FILE) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise VisionWeightsError(f"{path}: vision weight file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise VisionWeightsError(f"{path}: corrupt vision weight file ({e})") from None
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise VisionWeightsError(f"{path}: tensor {bad[0]} holds NaN or inf")
    return state


def write_vision_file(model, path: Path) -> None:
    """The vision encoder + projector + image adapters as float16 safetensors (temporary name, then renamed)."""
    import os

    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if is_vl_tensor(k)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model": VL_NAME})
    os.replace(tmp, path)


def vision_file() -> Path:
    """The shipped vision weights, or $OMNIMINI_VL_VISION (a file from your own `make omnimini-vl` run)."""
    import os

    return Path(os.environ.get("OMNIMINI_VL_VISION") or VISION_FILE)


def load_vl(text_model, text_tok, path: Path | None = None, strict: bool = False, in_place: bool = False):
    """(model, tokenizer) of omnimini-vl; with strict=False a missing or bad vision file gives the text model back
    with a one-line warning naming the file, so the server still serves text."""
    path = vision_file() if path is None else path
    try:
        tok = vl_tokenizer(text_tok)
        return attach_vision(text_model, tok, read_vision_file(path), where=str(path), in_place=in_place), tok
    except (VisionWeightsError, ValueError) as e:
        if strict:
            raise
        print(f"omnimini: warning: serving text only, without vision: {e}", file=sys.stderr)
        return text_model, text_tok
