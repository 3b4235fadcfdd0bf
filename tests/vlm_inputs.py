"""Inputs the VLM loader tests share: seeded noise images and a one-image user turn."""

import numpy as np
from PIL import Image


def noise_images(*sizes: tuple[int, int]) -> list[Image.Image]:
    """RGB noise images of the given (height, width) sizes, the same pixels on every call."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def image_messages(text: str, image=None) -> list[dict]:
    """One user turn: an image part (carrying `image` when given, as processors want it) then the text."""
    img = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [img, {"type": "text", "text": text}]}]
