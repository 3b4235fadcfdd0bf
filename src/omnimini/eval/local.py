"""In-process evaluation: generation and log-likelihood scoring straight on an OmniModel (no server)."""

from __future__ import annotations

import torch

from omnimini.engine.generate import GenRequest, generate
from omnimini.engine.sampling import SamplingParams
from omnimini.images import decode_data_url, to_pixels


def _images_and_messages(messages: list[dict], model) -> tuple[list[dict], list[torch.Tensor]]:
    """Pull images (PIL parts or data: URLs) out of the messages in order; leave `{"type": "image"}` markers."""
    pixels, out = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for p in content:
            if p.get("type") in ("image", "image_url"):
                if model.config.vision is None:
                    raise ValueError("this model has no vision encoder; image tasks need a vision model")
                img = p.get("image") or decode_data_url(p["image_url"]["url"])
                pixels.append(to_pixels(img, model.config.vision.image_size))
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, pixels


class LocalRunner:
    def __init__(self, model, tok, batch_size: int = 8):
        self.model, self.tok, self.batch_size = model, tok, batch_size

    def generate(self, batch: list[list[dict]], params: dict) -> list[str]:
        sp = SamplingParams(temperature=float(params.get("temperature", 0.0)),
                            top_p=float(params.get("top_p", 1.0)),
                            max_tokens=int(params.get("max_tokens") or params.get("max_completion_tokens") or 256),
                            seed=params.get("seed"))
        n_img = self.model.config.vision.tokens_per_image if self.model.config.vision else 0
        reqs = []
        for messages in batch:
            msgs, pix = _images_and_messages(messages, self.model)
            ids = self.tok.encode_chat(msgs, image_tokens=n_img)
            reqs.append(GenRequest(ids, sp, torch.stack(pix) if pix else None))
        outs = []
        for i in range(0, len(reqs), self.batch_size):
            outs += generate(self.model, reqs[i:i + self.batch_size], self.tok.eos_token_ids)
        texts = [self.tok.decode(o, skip_special=True) for o in outs]
        stops = params.get("stop") or []
        return [_cut(t, [stops] if isinstance(stops, str) else stops) for t in texts]

    @torch.inference_mode()
    def loglikelihood(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """Sum of log-probs of each continuation given its context (lm-evaluation-harness semantics:
        the pair is encoded as one string and the continuation is what follows the context's tokens)."""
        rows, spans = [], []
        for context, conts in items:
            ctx = self.tok.encode(context)
            for c in conts:
                whole = self.tok.encode(context + c)
                n_ctx = len(ctx) if whole[:len(ctx)] == ctx else len(self.tok.encode(context.rstrip()))
                rows.append(whole[-self.model.config.max_seq_len:])
                spans.append(len(whole) - n_ctx)
        scores = []
        for i in range(0, len(rows), self.batch_size):
            scores += self._score(rows[i:i + self.batch_size], spans[i:i + self.batch_size])
        out, k = [], 0
        for _, conts in items:
            out.append(scores[k:k + len(conts)])
            k += len(conts)
        return out

    def _score(self, rows, spans) -> list[float]:
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        logp = self.model(ids, attention_mask=mask).logits.float().log_softmax(-1)
        res = []
        for b, (r, n) in enumerate(zip(rows, spans, strict=True)):
            tgt = torch.tensor(r[len(r) - n:])
            pred = logp[b, len(r) - n - 1:len(r) - 1]
            res.append(float(pred.gather(1, tgt[:, None]).sum()))
        return res


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[:text.index(s)]
    return text


def make_local_client(spec: str, quantize: str = "none"):
    from omnimini.eval.clients import InProcessClient
    from omnimini.runtime import load_for_inference

    model, tok = load_for_inference(None if spec in ("default",) else spec, quantize=quantize)
    runner = LocalRunner(model, tok)
    return InProcessClient(runner.generate, runner.loglikelihood, model_id=str(spec))
