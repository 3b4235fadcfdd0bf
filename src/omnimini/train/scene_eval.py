"""Score a trained model on held-out procedural scene episodes (EVAL_SEEDS), with greedy decoding."""

from __future__ import annotations

import torch
from tqdm import tqdm

from omnimini.data.scene_samples import eval_pixels, make_family


def _prompt_ids(tok, ep, tokens_per_image: int) -> list[int]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ep.prompt}]}]
    return tok.encode_chat(msgs, add_generation_prompt=True, image_tokens=tokens_per_image)


@torch.no_grad()
def evaluate_scenes(model, tok, family: str = "qa", n: int = 200, qa_format: str | None = "mc",
                    batch_size: int = 16, max_tokens: int = 8, seed_offset: int = 0, progress: bool = False,
                    blind: bool = False) -> dict:
    """Accuracy of greedy answers on the first n EVAL_SEEDS episodes, next to chance (1/#options).
    blind=True shows a blank (mean-grey) image instead: what the model answers without looking."""
    from omnimini.data.scenes.tasks import EVAL_SEEDS
    from omnimini.engine.generate import GenRequest, generate
    from omnimini.engine.sampling import SamplingParams

    vis = model.config.vision
    fam = make_family(family, vis.image_size, qa_format)
    eps = [fam.episode(EVAL_SEEDS[seed_offset + i]) for i in range(n)]
    model.eval()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = []
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc=f"eval {family}"):
        chunk = eps[i:i + batch_size]
        reqs = []
        for ep in chunk:
            pixels = eval_pixels(ep, vis.image_size)
            reqs.append(GenRequest(_prompt_ids(tok, ep, vis.tokens_per_image), params,
                                   torch.zeros_like(pixels) if blind else pixels))
        outs = generate(model, reqs, tok.eos_token_ids)
        for ep, ids in zip(chunk, outs, strict=True):
            text = tok.decode(ids, skip_special=True)
            results.append({**fam.score(ep, text), "response": text, "subset": ep.subset,
                            "n_choices": len(ep.choices) if ep.choices else None})
    acc = sum(r["score"] for r in results) / max(1, len(results))
    mc = [r for r in results if r["n_choices"]]
    chance = sum(1 / r["n_choices"] for r in mc) / len(mc) if mc else None
    by_subset: dict[str, list[float]] = {}
    for r in results:
        by_subset.setdefault(r["subset"], []).append(r["score"])
    return {"family": family, "format": qa_format, "blind": blind, "n": len(results), "accuracy": acc, "chance": chance,
            "by_subset": {k: sum(v) / len(v) for k, v in sorted(by_subset.items())},
            "examples": [{k: r[k] for k in ("response", "parsed", "success")} for r in results[:5]]}


@torch.no_grad()
def choice_logprobs(model, tok, prompt_ids: list[int], pixels: torch.Tensor, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of each choice text (plus the closing <|im_end|>) as the assistant's answer."""
    end = tok.token_to_id("<|im_end|>")
    conts = [tok.encode(c, allow_special=False) + ([end] if end is not None else []) for c in choices]
    rows = [prompt_ids + c for c in conts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    out = model(ids, pixels=pixels.expand(len(rows), *pixels.shape[1:]).contiguous())
    logp = out.logits.float().log_softmax(-1)
    scores = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(c))
        scores.append(float(logp[i, pos, torch.tensor(c)].sum()))
    return scores


@torch.no_grad()
def batch_choice_logprobs(model, tok, items: list[tuple[list[int], torch.Tensor, list[str]]]) -> list[list[float]]:
    """choice_logprobs for several (prompt_ids, pixels [1, 3, S, S], choices) items in one forward: every image
    is encoded once and shared by its options' rows (right padding never changes a causal model's outputs)."""
    end = tok.token_to_id("<|im_end|>")
    embeds = model.encode_images(torch.cat([px for _, px, _ in items]))
    rows, conts, owner = [], [], []
    for k, (prompt, _, choices) in enumerate(items):
        for c in choices:
            cont = tok.encode(c, allow_special=False) + ([end] if end is not None else [])
            rows.append(prompt + cont)
            conts.append((len(prompt), cont))
            owner.append(k)
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    logp = model(ids, image_embeds=embeds[torch.tensor(owner)]).logits.float().log_softmax(-1)
    scores: list[list[float]] = [[] for _ in items]
    for i, (start, cont) in enumerate(conts):
        pos = torch.arange(start - 1, start - 1 + len(cont))
        scores[owner[i]].append(float(logp[i, pos, torch.tensor(cont)].sum()))
    return scores


@torch.no_grad()
def evaluate_scenes_loglik(model, tok, n: int = 200, seed_offset: int = 0, progress: bool = False,
                           blind: bool = False, batch_size: int = 8, mismatched: bool = False) -> dict:
    """Multiple-choice scene QA in the cloze formulation (as lm-eval scores ARC/HellaSwag): the open question
    (same seed, so the same scene and question as the multiple-choice episode) is asked, and the option whose
    text the model finds most likely as its answer is its pick. Chance is 1/#options.

    Controls for visual grounding: blind=True shows a blank (mean-grey) image, the accuracy answer priors alone
    reach; mismatched=True shows each question the image of the next evaluated scene (the same images, wrongly
    paired). A model that reads the image loses accuracy under both; the mismatched control is the stricter one,
    since a blank image is out of distribution and can lower the score of a model that never reads the scene."""
    from omnimini.data.scenes.qa import QAFamily
    from omnimini.data.scenes.tasks import EVAL_SEEDS

    if blind and mismatched:
        raise ValueError("choose one control: blind or mismatched")
    if mismatched and n < 2:
        raise ValueError("the mismatched-image control needs n >= 2 scenes")
    vis = model.config.vision
    mc, short = QAFamily(vis.image_size, "mc"), QAFamily(vis.image_size, "short")
    model.eval()
    hits, chance, by_subset = [], [], {}
    seeds = EVAL_SEEDS[seed_offset:seed_offset + n]
    for lo in tqdm(range(0, n, batch_size), disable=not progress, desc="eval qa (loglik)"):
        idx = range(lo, min(n, lo + batch_size))
        eps = [(mc.episode(seeds[i]), short.episode(seeds[i])) for i in idx]
        items = []
        for i, (ep_mc, ep_short) in zip(idx, eps, strict=True):
            shown = short.episode(seeds[(i + 1) % n]) if mismatched else ep_short
            pixels = eval_pixels(shown, vis.image_size)
            items.append((_prompt_ids(tok, ep_short, vis.tokens_per_image),
                          torch.zeros_like(pixels) if blind else pixels, ep_mc.choices))
        for (ep_mc, _), scores in zip(eps, batch_choice_logprobs(model, tok, items), strict=True):
            pick = "ABCDEFGH"[max(range(len(scores)), key=scores.__getitem__)]
            hits.append(float(pick == ep_mc.answer))
            chance.append(1 / len(ep_mc.choices))
            by_subset.setdefault(ep_mc.subset, []).append(hits[-1])
    control = "-blind" if blind else "-mismatched" if mismatched else ""
    return {"family": "qa", "format": "mc-loglik" + control, "n": n,
            "accuracy": sum(hits) / n, "chance": sum(chance) / n,
            "by_subset": {k: sum(v) / len(v) for k, v in sorted(by_subset.items())}}
