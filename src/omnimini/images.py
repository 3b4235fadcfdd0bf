"""Image input: decode bytes/paths/data URLs safely and turn them into the encoder's pixel tensors."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from omnimini.model.vision import MEAN, STD


class ImageError(ValueError):
    """An input that is not a usable image (corrupt, unsupported format, too large)."""


@dataclass
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # width*height checked from the header, before any pixel is decoded
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")


DEFAULT_LIMITS = ImageLimits()


def open_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.format not in limits.formats:
                raise ImageError(f"unsupported image format {img.format}; supported: {', '.join(limits.formats)}")
            w, h = img.size
            if w * h > limits.max_pixels:  # a decompression bomb is refused before it allocates
                raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    return img.convert("RGB")


def decode_data_url(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    if not url.startswith("data:"):
        raise ImageError("only data: URLs are accepted here (remote image fetching is disabled)")
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise ImageError("data URL must be base64-encoded (data:image/png;base64,...)")
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise ImageError(f"image data URL exceeds the {limits.max_bytes}-byte limit")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL has corrupt base64") from None
    return open_image(raw, limits)


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    try:
        return open_image(p.read_bytes(), limits)
    except ImageError as e:
        raise ImageError(f"{p}: {e}") from None


def to_pixels(img: Image.Image, size: int, mean=MEAN, std=STD, resize: str = "square") -> torch.Tensor:
    """Resize to size x size (bicubic) and normalise -> float32 [3, size, size]. resize="crop": the shortest side
    to `size` (the other in proportion, truncated) and a centred size x size crop, as CLIP's processor does."""
    img = img.convert("RGB")
    if resize == "crop":
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    t = t.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (t - mean) / std


def vision_pixels(img: Image.Image, vision) -> torch.Tensor:
    """An image as the model's vision tower takes it (its VisionConfig's size, resizing and normalisation)."""
    return to_pixels(img, vision.image_size, vision.image_mean, vision.image_std, vision.resize)
