"""Image input: decode bytes/paths/data URLs safely and turn them into the encoder's pixel tensors."""

from __future__ import annotations

import base64
import binascii
import io
import math
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


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR}


def _normalise(img: Image.Image, mean, std) -> torch.Tensor:
    w, h = img.size
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    t = t.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (t - mean) / std


def to_pixels(img: Image.Image, size: int, mean=MEAN, std=STD, resize: str = "square",
              resample: str = "bicubic") -> torch.Tensor:
    """Resize to size x size and normalise -> float32 [3, size, size]. resize="crop": the shortest side
    to `size` (the other in proportion, truncated) and a centred size x size crop, as CLIP's processor does."""
    img = img.convert("RGB")
    f = RESAMPLE[resample]
    if resize == "crop":
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), f)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), f)
    return _normalise(img, mean, std)


# Idefics3's processor caps any side at 4096 px after its longest-edge resize
_MAX_SIDE = 4096


def _longest_edge(w: int, h: int, edge: int) -> tuple[int, int]:
    """(w, h) with the longest side at `edge`, the other in proportion, truncated, then rounded up to even (as
    Idefics3's processor computes it: small images are enlarged too), then capped at 4096."""
    aspect = w / h
    if w >= h:
        w, h = edge, int(edge / aspect)
        h += h % 2
    else:
        h, w = edge, int(edge * aspect)
        w += w % 2
    w, h = max(w, 1), max(h, 1)
    aspect = w / h
    if w >= h and w > _MAX_SIDE:
        w, h = _MAX_SIDE, int(_MAX_SIDE / aspect)
    elif h > w and h > _MAX_SIDE:
        h, w = _MAX_SIDE, int(_MAX_SIDE * aspect)
    return max(w, 1), max(h, 1)


def _tile_multiple(w: int, h: int, tile: int) -> tuple[int, int]:
    """(w, h) rounded up to multiples of the tile side: the longer side first, the other from the aspect ratio."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return max(w, tile), max(h, tile)  # a sliver (aspect > 2 * tile) would round to 0 px, which cannot be resized


def split_tiles(img: Image.Image, vision) -> tuple[list[Image.Image], int, int]:
    """Idefics3 / SmolVLM image splitting: (tiles in row-major order then the global image, rows, cols); rows =
    cols = 0 when the image is one tile."""
    img = img.convert("RGB")
    f, tile = RESAMPLE[vision.resample], vision.image_size
    if vision.max_edge is not None:
        img = img.resize(_longest_edge(*img.size, vision.max_edge), f)
    if not vision.split_images:
        return [img.resize((tile, tile), f)], 0, 0
    img = img.resize(_tile_multiple(*img.size, tile), f)
    w, h = img.size
    if w <= tile and h <= tile:
        return [img], 0, 0
    rows, cols = h // tile, w // tile
    tiles = [img.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return tiles + [img.resize((tile, tile), f)], rows, cols


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): each side rounded to a multiple of `factor` (patch x merge), then
    scaled (keeping the aspect ratio, floored / ceiled to the factor) into min_pixels..max_pixels."""
    if max(h, w) / min(h, w) > 200:
        raise ImageError(f"image of {w}x{h} px: an aspect ratio over 200 is not supported")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def native_pixels(img: Image.Image, vision) -> torch.Tensor:
    """An image at its own aspect ratio (resize="smart", Qwen2-VL): normalised [3, H, W] with H and W multiples
    of patch_size x pixel_shuffle; the tower cuts it into patches."""
    img = img.convert("RGB")
    w, h = img.size
    th, tw = smart_resize(h, w, vision.patch_size * vision.pixel_shuffle, vision.min_pixels, vision.max_pixels)
    if (tw, th) != (w, h):
        img = img.resize((tw, th), RESAMPLE[vision.resample])
    return _normalise(img, vision.image_mean, vision.image_std)


def vision_tiles(img: Image.Image, vision) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image as the model's vision tower takes it: [tiles, 3, S, S] (one tile unless the family splits images)
    and the split's (rows, cols), (0, 0) when it is not split."""
    if vision.resize != "tiles":
        views = [img]
        if vision.pan_and_scan:  # Gemma 3: the whole image, then its crops, each one square view; grid (0, crops)
            from omnimini.pan_and_scan import pan_and_scan

            views += pan_and_scan(img.convert("RGB"), vision)
        return torch.stack([to_pixels(v, vision.image_size, vision.image_mean, vision.image_std, vision.resize,
                                      vision.resample) for v in views]), (0, len(views) - 1)
    tiles, rows, cols = split_tiles(img, vision)
    return torch.stack([_normalise(t, vision.image_mean, vision.image_std) for t in tiles]), (rows, cols)


def vision_pixels(img: Image.Image, vision) -> torch.Tensor:
    """A one-tile image as the tower takes it: [3, S, S] (families that split images: vision_tiles)."""
    pixels, grid = vision_tiles(img, vision)
    if pixels.shape[0] != 1:
        raise ValueError(f"this model splits images into tiles ({grid[0]}x{grid[1]} + 1); use vision_tiles")
    return pixels[0]


def prompt_texts(vision, grids: list[tuple[int, int]], image_token: str) -> list[str] | None:
    """What each image's placeholder becomes in the prompt, for families that write images their own way
    (None: the template writes image_tokens placeholders itself, or the tokenizer repeats its one placeholder)."""
    n = vision.tokens_per_image
    if vision.image_prompt == "gemma3":  # Gemma3Processor's expansion of each <start_of_image> (and its crops)
        from omnimini.pan_and_scan import crops_prompt

        return [crops_prompt(f"\n\n{GEMMA_BOI}{image_token * n}{GEMMA_EOI}\n\n", crops) for _, crops in grids]
    if vision.image_prompt != "idefics3":
        return None
    whole = f"{FAKE_IMAGE}{GLOBAL_IMAGE}{image_token * n}{FAKE_IMAGE}"
    out = []
    for rows, cols in grids:
        if rows == 0:
            out.append(whole)
            continue
        text = "".join("".join(f"{FAKE_IMAGE}<row_{r + 1}_col_{c + 1}>{image_token * n}" for c in range(cols)) + "\n"
                       for r in range(rows))
        out.append(text + "\n" + whole)
    return out


FAKE_IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<global-img>"  # Idefics3's image framing tokens
GEMMA_BOI, GEMMA_EOI = "<start_of_image>", "<end_of_image>"  # Gemma 3's


@dataclass
class ImageInputs:
    # [tiles, 3, S, S]: every image's tiles in prompt order; resize="smart": a list of [3, H, W], one per image
    pixels: torch.Tensor | list[torch.Tensor]
    texts: list[str] | None  # each image's prompt text (prompt_texts), None where the template writes it
    image_tokens: int  # placeholders per tile (the template's image_tokens; 0 where they differ per image)


def image_inputs(images: list[Image.Image], vision, image_token: str | None) -> ImageInputs:
    """Images of one request -> the tower's pixels and how the prompt writes them."""
    if vision.resize == "smart":  # each image at its own size: as many placeholders as its merged patch grid
        pixels = [native_pixels(img, vision) for img in images]
        side = vision.patch_size * vision.pixel_shuffle
        texts = [(image_token or "") * ((p.shape[1] // side) * (p.shape[2] // side)) for p in pixels]
        return ImageInputs(pixels, texts, 0)
    pixels, grids = zip(*(vision_tiles(img, vision) for img in images), strict=True)
    return ImageInputs(torch.cat(pixels), prompt_texts(vision, list(grids), image_token or ""),
                       vision.tokens_per_image)
