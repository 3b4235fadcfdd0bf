"""Load a model for inference (any supported format, optional quantization) and small in-process helpers."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def resolve_quantize(quantize: str, from_gguf: bool) -> str:
    """"auto": a GGUF keeps its own blocks on omnimini's kernels (other tensors -> q8_0); without the kernels, or
    for float sources, fbgemm fp16 (greedy outputs as float32). Any other mode is itself."""
    if quantize != "auto":
        return quantize
    from omnimini import kernels

    return "q8_0" if from_gguf and kernels.available() else "fp16"


def load_for_inference(spec: str | None, quantize: str = "none", device: str = "cpu", mmproj: str | None = None):
    """(model, tokenizer) from an omnimini dir, HF dir, .gguf file or model name; None -> the default model.
    mmproj: a llama.cpp vision projector file for a GGUF language model (weights/gguf_mmproj.py)."""
    from omnimini.engine.quant import BLOCK_MODES
    from omnimini.weights.convert import load_any

    gguf = native = None
    if (quantize in BLOCK_MODES or quantize == "auto") and device == "cpu":
        from omnimini.weights.gguf_native import gguf_source

        gguf = gguf_source(spec)  # a GGUF source keeps its own blocks (read from the file, not re-quantized)
    quantize = resolve_quantize(quantize, gguf is not None)
    if gguf is not None and quantize in BLOCK_MODES:
        from omnimini.weights.gguf_native import load_native

        model, tok, native = load_native(spec, gguf, quantize)
        from omnimini.weights.convert import with_default_vision

        model, tok = with_default_vision(spec, model, tok, in_place=True)  # omnimini-vl on the same text blocks
    else:
        model, tok = load_any(spec, device=device, dtype=torch.float32)
    model.eval()
    if quantize and quantize != "none":
        from omnimini.engine.quant import quantize_model
        from omnimini.engine.smooth import CALIBRATION_TEXT

        model = quantize_model(model, quantize, calib_ids=tok.encode(CALIBRATION_TEXT), native=native)
    if mmproj is not None:  # after quantizing: the tower stays float32 (quantize_model knows no tower)
        from omnimini.weights.gguf_mmproj import attach_mmproj

        attach_mmproj(model, tok, mmproj)
    return model, tok


# `--compile` (torch.compile of a hand-written second copy of the decode layer, engine/fast_decode.py) is retired:
# measured on the default model with the kernels, 1 thread: 63.8 vs 60.4 tok/s eager at batch 1 (1.06x), 163.1 vs
# 161.1 at batch 16 (1.01x), for 286 s of compiling before the first token. The flag is still accepted.
COMPILE_RETIRED = ("omnimini: --compile is no longer needed and is ignored: the eager decode runs omnimini's own "
                   "kernels, within 6% of the old compiled step without its minutes of compiling")


def local_stream_fn(model, tok, temperature: float = 0.7, max_tokens: int = 512):
    """A `messages -> iterator of text pieces` function over the in-process engine (terminal chat)."""
    from omnimini.engine.sampling import SamplingParams
    from omnimini.engine.scheduler import Engine, EngineRequest

    engine = Engine(model, tok, max_batch=1)

    def stream(messages: list[dict]) -> Iterator[str]:
        ids, pixels = encode_messages(model, tok, messages)
        req = EngineRequest(ids, SamplingParams(temperature=temperature, max_tokens=max_tokens), pixels=pixels)
        for ev in engine.stream_sync(req):
            if ev.text:
                yield ev.text

    return stream


def encode_messages(model, tok, messages: list[dict]) -> tuple[list[int], torch.Tensor | None]:
    """Chat messages (images as PIL `image` parts or data: URL `image_url` parts) -> prompt ids and pixels."""
    from omnimini.images import decode_data_url, image_inputs

    images, msgs = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            msgs.append(m)
            continue
        parts = []
        for p in content:
            if p.get("type") in ("image", "image_url"):
                if model.config.vision is None:
                    raise ValueError("this model has no vision encoder; it cannot take images")
                images.append(p.get("image") or decode_data_url(p["image_url"]["url"]))
                parts.append({"type": "image"})
            else:
                parts.append(p)
        msgs.append({**m, "content": parts})
    if not images:
        return tok.encode_chat(msgs), None
    inputs = image_inputs(images, model.config.vision, tok.image_token)
    return tok.encode_chat(msgs, image_tokens=inputs.image_tokens, image_texts=inputs.texts), inputs.pixels
