"""Gemma 3's pan-and-scan: a wide (or tall) image is shown to the tower whole and as a few crops side by side.

The tower sees a fixed square, so a 3:1 panorama squeezed into it loses most of its detail. Gemma3ImageProcessor's
pan-and-scan (off unless the preprocessor config or the caller turns it on) keeps the squeezed whole image and adds
crops along the long side: about one per aspect-ratio unit (w / h rounded half up), at most
floor(long side / min_crop) so none is thinner than min_crop px, then clamped into 2 .. max_crops. It does nothing
when the aspect ratio is under min_ratio or a crop would be shorter than min_crop on either side. Crops are cut
from the original pixels at multiples of ceil(long side / crops), so the last one is narrower when the side does
not divide (a slice past the edge stops at the edge). Each view is then resized to the tower's square like any
image. In the prompt, the processor writes "Here is the original image <view> and here are some crops to help you
see better <view> <view> ..." in place of the image's one <start_of_image> (crops_prompt).
"""

from __future__ import annotations

import math

from PIL import Image


def crop_boxes(width: int, height: int, min_crop: int, max_crops: int, min_ratio: float) -> list[tuple[int, ...]]:
    """PIL boxes (left, top, right, bottom) of the crops, row-major; [] when the image is not cropped."""
    wide = width >= height
    long, short = (width, height) if wide else (height, width)
    if long / short < min_ratio:
        return []
    n = min(int(math.floor(long / short + 0.5)), long // min_crop)
    n = min(max_crops, max(2, n))  # at least two crops: one would be the whole image again
    size = math.ceil(long / n)
    if min(size, short) < min_crop:  # e.g. a short side under min_crop: crops too small to be worth a view
        return []
    starts = [size * i for i in range(n)]
    if wide:
        return [(x, 0, min(x + size, width), height) for x in starts]
    return [(0, y, width, min(y + size, height)) for y in starts]


def pan_and_scan(img: Image.Image, vision) -> list[Image.Image]:
    """The image's crops (not the image itself) under the VisionConfig's pan-and-scan settings."""
    boxes = crop_boxes(*img.size, vision.pan_min_crop, vision.pan_max_crops, vision.pan_min_ratio)
    return [img.crop(b) for b in boxes]


def crops_prompt(view: str, crops: int) -> str:
    """What Gemma3Processor writes for an image with `crops` crops, `view` being one view's framed soft tokens."""
    if not crops:
        return view
    return (f"Here is the original image {view} and here are some crops to help you see better "
            + " ".join([view] * crops))
