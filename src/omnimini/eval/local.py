"""In-process evaluation: generation and log-likelihood scoring straight on an OmniModel (no server)."""

from __future__ import annotations

import torch

from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineRequest
from omnimini.runtime import encode_messages


class LocalRunner:
    def __init__(self, model, tok, batch_size: int = 8, token_budget: int = 4096):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.token_budget = token_budget  # log-likelihood: padded tokens per forward (not a row count)
        self.tokens_scored = self.truncated = self.batches = 0  # for the progress bar and the final report
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

    def stats(self) -> dict:
        return {"tokens_scored": self.tokens_scored, "truncated": self.truncated}

    @torch.inference_mode()
    def loglikelihood(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """Sum of log-probs of each continuation given its context, lm-evaluation-harness semantics (see
        loglik.encode_pair). Each distinct context is encoded once for all its continuations (loglik.py)."""
        from omnimini.eval.loglik import score_requests

        reqs = [(context, c) for context, conts in items for c in conts]
        scores, stats = score_requests(self.model, self.tok, reqs, token_budget=self.token_budget)
        self.tokens_scored += stats.tokens
        self.truncated += stats.truncated
        self.batches += stats.batches
        out, k = [], 0
        for _, conts in items:
            out.append(scores[k:k + len(conts)])
            k += len(conts)
        return out


def make_local_client(spec: str, quantize: str = "none"):
    from omnimini.eval.clients import InProcessClient
    from omnimini.runtime import load_for_inference

    model, tok = load_for_inference(spec, quantize=quantize)  # load_any knows "default"
    runner = LocalRunner(model, tok)
    if spec is None:
        from omnimini.weights.default import DEFAULT_MODEL_NAME

        spec = DEFAULT_MODEL_NAME  # the name `serve` gives it, so caches and reports name the model
    return InProcessClient(runner.generate, runner.loglikelihood, model_id=str(spec), stats_fn=runner.stats,
                           max_batch=256)
