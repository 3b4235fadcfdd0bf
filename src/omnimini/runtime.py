"""Load a model for inference (any supported format, optional quantization) and small in-process helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def load_for_inference(spec: str | None, quantize: str = "none", device: str = "cpu"):
    """(model, tokenizer) from an omnimini dir, HF dir, .gguf file or model name; None -> the default model."""
    try:
        from omnimini.weights.convert import load_any
    except ImportError:
        load_any = None
    if load_any is not None:
        model, tok = load_any(spec, device=device, dtype=torch.float32)
    else:
        from omnimini.model import OmniModel
        from omnimini.tokenizer import Tokenizer

        if spec is None:
            raise ValueError("--model is required (no default model available in this install)")
        model, tok = OmniModel.from_pretrained(spec, device=device), Tokenizer.from_dir(Path(spec))
    model.eval()
    if quantize and quantize != "none":
        from omnimini.engine.quant import quantize_model

        model = quantize_model(model, quantize)
    return model, tok


def local_stream_fn(model, tok, temperature: float = 0.7, max_tokens: int = 512):
    """A `messages -> iterator of text pieces` function over the in-process model (terminal chat)."""
    from omnimini.engine.generate import GenRequest, generate_stream
    from omnimini.engine.sampling import SamplingParams
    from omnimini.images import decode_data_url, to_pixels
    from omnimini.tokenizer import IncrementalDecoder

    def stream(messages: list[dict]) -> Iterator[str]:
        pixels, n_img = [], 0
        for m in messages:
            for part in m["content"] if isinstance(m.get("content"), list) else []:
                if part.get("type") == "image_url":
                    if model.config.vision is None:
                        raise ValueError("this model has no vision encoder; it cannot take images")
                    n_img = model.config.vision.tokens_per_image
                    pixels.append(to_pixels(decode_data_url(part["image_url"]["url"]), model.config.vision.image_size))
        ids = tok.encode_chat(messages, image_tokens=n_img)
        req = GenRequest(ids, SamplingParams(temperature=temperature, max_tokens=max_tokens),
                         torch.stack(pixels) if pixels else None)
        dec = IncrementalDecoder(tok, skip_special=True)
        for _, t in generate_stream(model, [req], tok.eos_token_ids):
            piece = dec.push(t)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    return stream
