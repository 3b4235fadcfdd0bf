"""Batched generation with a KV cache: right-padded prefill, then one token per sequence per step.

This is the simple synchronous path (CLI, tests, log-likelihood scoring); the serving scheduler reuses the
same model calls with continuous batching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from omnimini.engine.sampling import SamplingParams, adjust_logits, make_generator, sample_token


class PromptTooLongError(ValueError):
    pass


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # [n_images, 3, S, S] for the placeholders in prompt_ids (a list of [3, H, W]: images at their own size)
    pixels: torch.Tensor | list[torch.Tensor] | None = None


def check_length(n_prompt: int, max_len: int) -> None:
    if n_prompt >= max_len:
        raise PromptTooLongError(f"prompt is {n_prompt} tokens; the context window is {max_len} tokens")


def first_image(prompt_ids: list[int], image_token_id: int | None) -> int:
    """Position of the prompt's first image placeholder (model.NO_IMAGE if none): where its image adapters start,
    which decode steps must be told since their one new token is not an image."""
    from omnimini.model.model import NO_IMAGE

    if image_token_id is None or image_token_id not in prompt_ids:
        return NO_IMAGE
    return prompt_ids.index(image_token_id)


def _pad(rows: list[list[int]], pad: int, device=None) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long, device=device)


@torch.inference_mode()
def prefill(model, cache, rows: list[list[int]], slots: torch.Tensor, image_embeds=None,
            rope_positions=None) -> torch.Tensor:
    """Run right-padded prompts through the model into cache rows `slots`; return each row's last logits.
    rope_positions: M-RoPE coordinates of the padded rows [B, T, 3] (see mrope_prefill)."""
    dev = model.norm.weight.device  # (the embedding may hold quantized blocks)
    ids = _pad(rows, 0, dev)
    B, T = ids.shape
    positions = torch.arange(T, device=dev).expand(B, T)
    out = model(ids, positions=positions, cache=cache, slots=slots.to(dev), image_embeds=image_embeds,
                rope_positions=rope_positions)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    return out.logits[torch.arange(B, device=dev), last].float().cpu()


@torch.inference_mode()
def generate_stream(model, requests: list[GenRequest], eos_ids: list[int]) -> Iterator[tuple[int, int]]:
    """Yield (request index, token id) as tokens are produced, all requests decoded together."""
    max_len = model.config.max_seq_len
    for r in requests:
        check_length(len(r.prompt_ids), max_len)
    B = len(requests)
    total = max(min(len(r.prompt_ids) + r.params.max_tokens, max_len) for r in requests)
    cache = model.new_cache(B, total)
    slots = torch.arange(B)
    embeds = None
    pix = [r.pixels for r in requests if r.pixels is not None]
    dev = model.norm.weight.device  # (the embedding may hold quantized blocks)
    if pix and isinstance(pix[0], list):  # images at their own sizes: one list, in prompt order
        embeds = model.encode_images([p.to(dev) for images in pix for p in images])
    elif pix:
        embeds = model.encode_images(torch.cat(pix).to(dev))
    rope, deltas = mrope_prefill(model, requests)
    logits = prefill(model, cache, [r.prompt_ids for r in requests], slots, embeds,
                     None if rope is None else rope.to(dev))
    image_from = torch.tensor([first_image(r.prompt_ids, model.config.image_token_id) for r in requests], device=dev)
    gens = [make_generator(r.params.seed) for r in requests]
    counts = torch.zeros(B, model.config.vocab_size)
    lengths = torch.tensor([len(r.prompt_ids) for r in requests])
    done = [False] * B
    produced = [0] * B
    while True:
        nxt = []
        for i, r in enumerate(requests):
            if done[i]:
                nxt.append(0)
                continue
            row = adjust_logits(logits[i], r.params, counts[i])
            tok = sample_token(row, r.params, gens[i])
            counts[i, tok] += 1
            produced[i] += 1
            stop = (tok in eos_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids
            if not stop:
                yield i, tok
            if stop or produced[i] >= r.params.max_tokens or lengths[i] + 1 >= max_len:
                done[i] = True
            nxt.append(tok)
        if all(done):
            return
        ids = torch.tensor(nxt, device=dev)[:, None]
        rp = None if deltas is None else (lengths + deltas)[:, None].to(dev)  # M-RoPE: behind the cache position
        out = model(ids, positions=lengths[:, None].to(dev), cache=cache, slots=slots.to(dev), image_from=image_from,
                    logits_for="last", rope_positions=rp)
        logits = out.logits[:, -1].float().cpu()
        lengths += 1


def mrope_prefill(model, requests: list[GenRequest]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """M-RoPE (Qwen2-VL) requests with images: ([B, T, 3] rotary coordinates of the right-padded prompts,
    [B] what each row's decode steps add to their cache position); (None, None) when rotary positions are the
    cache positions (no M-RoPE, or no image: a text prompt's three coordinates are its positions)."""
    if model.config.mrope_section is None or all(r.pixels is None for r in requests):
        return None, None
    T = max(len(r.prompt_ids) for r in requests)
    rope = torch.arange(T).repeat(len(requests), 1)[..., None].repeat(1, 1, 3)
    deltas = torch.zeros(len(requests), dtype=torch.long)
    for i, r in enumerate(requests):
        if r.pixels is not None:
            coords, delta = model.mrope_positions(torch.tensor([r.prompt_ids]), r.pixels)
            deltas[i] = int(delta[0])
            rope[i] += deltas[i]  # (the pad tail: any position, never read)
            rope[i, : len(r.prompt_ids)] = coords[0]
    return rope, deltas


def generate(model, requests: list[GenRequest], eos_ids: list[int],
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in requests]
    for i, tok in generate_stream(model, requests, eos_ids):
        outs[i].append(tok)
        if on_token:
            on_token(i, tok)
    return outs
