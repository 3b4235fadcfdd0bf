"""In-process evaluation: generation and log-likelihood scoring straight on an OmniModel (no server)."""

from __future__ import annotations

import torch

from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineRequest
from omnimini.runtime import encode_messages


class LocalRunner:
    def __init__(self, model, tok, batch_size: int = 8):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # continuous batching: short answers leave the batch early
            self._engine = Engine(self.model, self.tok, max_batch=self.batch_size,
                                  max_context=min(self.model.config.max_seq_len, 4096))
        return self._engine

    def generate(self, batch: list[list[dict]], params: dict) -> list[str]:
        sp = SamplingParams(temperature=float(params.get("temperature", 0.0)),
                            top_p=float(params.get("top_p", 1.0)),
                            max_tokens=int(params.get("max_tokens") or params.get("max_completion_tokens") or 256),
                            seed=params.get("seed"))
        stops = params.get("stop") or []
        sp.stop = [stops] if isinstance(stops, str) else list(stops)
        room = self.engine.max_context - sp.max_tokens
        reqs = []
        for messages in batch:
            ids, pixels = encode_messages(self.model, self.tok, messages)
            if len(ids) > room and pixels is None:
                ids = ids[-room:]  # like lm-evaluation-harness: keep the end of an over-long prompt
            reqs.append(EngineRequest(ids, sp, pixels=pixels))
        return [r.completions[0].text for r in self.engine.generate(reqs)]

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


def make_local_client(spec: str, quantize: str = "none"):
    from omnimini.eval.clients import InProcessClient
    from omnimini.runtime import load_for_inference

    model, tok = load_for_inference(spec, quantize=quantize)  # load_any knows "default"
    runner = LocalRunner(model, tok)
    return InProcessClient(runner.generate, runner.loglikelihood, model_id=str(spec))
