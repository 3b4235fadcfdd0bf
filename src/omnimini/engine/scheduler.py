"""Continuous-batching engine: a background thread that owns the model and a slot-based KV cache.

Every loop iteration (1) takes new requests and aborts, (2) admits waiting requests while cache slots and the
KV token budget allow, (3) runs one chunk of prefill for admitted requests (several prompts padded into one
call, at most `prefill_chunk` tokens) and (4) one batched decode step for every running sequence. Requests
therefore join and leave the running batch between decode steps, and a long prompt never stalls the streams
that are already flowing.

n > 1: the prompt is prefilled once into the first sequence's slot and its KV rows copied to the others.
Images are encoded once per request at admission; prefill chunks take the embeddings of the placeholders
they contain.

Prefix caching (engine/prefix_cache.py): before a request's prefill chunk, the pooled KV blocks that continue
its prompt are copied into its slot and skipped; after each chunk, the prompt's newly computed full blocks are
pooled. Lookups happen chunk by chunk, so requests that arrive together with one long shared prefix reuse the
blocks the first of them has just computed.

Background requests (EngineRequest.priority > 0, e.g. Batch API lines, see `background_priority`) never delay
interactive ones: waiting interactive requests are admitted and prefilled first, and background requests leave
a quarter of the slots free for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from omnimini.engine.generate import first_image
from omnimini.engine.prefix_cache import PrefixCache, block_keys, image_digest
from omnimini.engine.sampling import SamplingParams, adjust_logits, make_generator, sample_token
from omnimini.engine.structured import Constraint, GrammarState
from omnimini.model.layers import KVCache
from omnimini.model.model import NO_IMAGE

log = logging.getLogger("omnimini.engine")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_BACKGROUND = contextvars.ContextVar("omnimini_background_priority", default=False)


@contextlib.contextmanager
def background_priority():
    """Requests submitted in this context (this task and the tasks it starts) run at background priority."""
    token = _BACKGROUND.set(True)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)


class EngineError(RuntimeError):
    """A request failed inside the engine (the engine itself keeps running)."""


class EngineClosedError(EngineError):
    """The engine is shutting down and takes no new requests."""


class RequestTooLargeError(ValueError):
    """A request that can never fit the context window or the KV budget."""


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    # [n_images, 3, S, S] for the image placeholders in prompt_ids (a list of [3, H, W]: images at their own size)
    pixels: torch.Tensor | list[torch.Tensor] | None = None
    constraint: Constraint | None = None  # grammar every sequence must follow
    priority: int = 0  # 0 interactive; > 0 background (admitted after interactive requests, never in their slots)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[int, str, float, list[int]]] = field(default_factory=list)


@dataclass
class EngineEvent:
    """Progress of one sequence (choice `index`) of a request; `finish_reason` set on its last event."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens this sequence has produced so far
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (final once decoding has begun)


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob]


@dataclass
class GenerationResult:
    request_id: str
    prompt_tokens: int
    completions: list[Completion]
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass
class EngineStats:
    requests_total: int = 0
    background_requests_total: int = 0  # of those, submitted at background priority (batch lines)
    requests_finished: dict = field(default_factory=dict)  # finish_reason -> count
    prompt_tokens_total: int = 0
    prompt_tokens_cached_total: int = 0  # of those, served from the prefix cache
    generation_tokens_total: int = 0
    waiting: int = 0
    running: int = 0
    ttft_buckets: list = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, b in enumerate(TTFT_BUCKETS):
            if seconds <= b:
                self.ttft_buckets[i] += 1


# ---- per-request / per-sequence state -----------------------------------------------------------------------

class _Seq:
    def __init__(self, req: _Req, index: int, vocab: int):
        p = req.params
        self.req, self.index, self.slot = req, index, -1
        self.gen = make_generator(None if p.seed is None else p.seed + index)
        self.counts = torch.zeros(vocab) if (p.presence_penalty or p.frequency_penalty) else None
        self.tokens: list[int] = []
        self.cached = 0  # tokens of this sequence already in the KV cache
        self.pending = -1  # sampled token not yet fed to the model
        self.text = ""
        self.emitted = 0  # chars of self.text already sent
        self.utf8 = None  # incremental UTF-8 decoder (set by the engine)
        self.grammar: GrammarState | None = req.req.constraint.new_state() if req.req.constraint else None
        self.finished: str | None = None


class _Req:
    def __init__(self, req: EngineRequest, sink: Callable[[EngineEvent], None], vocab: int, reserve: int):
        self.req, self.sink = req, sink
        self.params = req.params
        self.prompt = list(req.prompt_ids)
        self.reserve = reserve  # KV tokens reserved while it runs
        self.seqs = [_Seq(self, i, vocab) for i in range(req.n)]
        self.prefilled = 0
        self.cached_tokens = 0  # prompt tokens copied from the prefix cache
        self.block_keys: list[bytes] = []  # chain-hash keys of the prompt's full blocks (prefix cache on)
        self.image_embeds: torch.Tensor | None = None  # [n_placeholders, hidden]
        self.image_from = NO_IMAGE  # position of the first image placeholder (the image adapters start there)
        # M-RoPE (Qwen2-VL): the prompt's [len, 3] rotary coordinates, and what decode steps add to their cache
        # position (the rotary positions after an image run behind the token count)
        self.rope_positions: torch.Tensor | None = None
        self.rope_delta = 0
        self.t_submit = time.monotonic()
        self.t_first: float | None = None

    @property
    def id(self) -> str:
        return self.req.request_id


# ---- the engine ---------------------------------------------------------------------------------------------

class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_context: int | None = None,
                 kv_budget_tokens: int | None = None, prefill_chunk: int = 256, name: str = "model",
                 threads: int | None = int(os.environ.get("OMNIMINI_ENGINE_THREADS", "1")),
                 prefix_cache_tokens: int | None = None,
                 prefix_block_size: int = 32, kv_cache: str = "auto"):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.max_batch = max_batch
        self.max_context = min(max_context or cfg.max_seq_len, cfg.max_seq_len)
        self.kv_budget = kv_budget_tokens or max_batch * self.max_context
        self.prefill_chunk = prefill_chunk
        self.threads = threads  # torch intra-op threads of the engine thread (None: leave as is)
        self.vocab = cfg.vocab_size
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.token_bytes = tokenizer.all_token_bytes()
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad != cfg.image_token_id and pad < self.vocab else 0
        # logits past the tokenizer's vocabulary are padding rows of the embedding: never sample them
        tv = min(tokenizer.vocab_size, self.vocab)
        invalid = torch.arange(self.vocab) >= tv
        if cfg.image_token_id is not None and cfg.image_token_id < self.vocab:
            # an image placeholder is input only: sampled, it would come back in the next turn's prompt as a
            # placeholder without an image (a 400 for a stored conversation continued with previous_response_id)
            invalid[cfg.image_token_id] = True
        self._invalid = invalid if bool(invalid.any()) else None
        kv_dtype = model.kv_cache_dtype(kv_cache)
        # allocated as it fills (KVCache.reserve): a server of short chats never holds 16 x 2048 positions
        self.cache = model.new_cache(max_batch, self.max_context, dtype=kv_dtype, reserve=KVCache.GROW)
        # prefix cache: its own pool beside the slots (default a quarter of the slots' KV budget); 0 turns it off
        pc = self.kv_budget // 4 if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefix_cache = PrefixCache(self.cache, pc, prefix_block_size) if pc >= prefix_block_size else None
        self.ready = threading.Event()  # set once the engine thread serves
        self.stats = EngineStats()
        self._free_slots = list(range(max_batch))
        self._interactive_slots = max_batch // 4 if max_batch >= 4 else (1 if max_batch > 1 else 0)
        self._reserved = 0
        self._cv = threading.Condition()
        self._inbox: deque[_Req] = deque()
        self._aborts: set[str] = set()
        self._waiting: deque[_Req] = deque()
        self._prefilling: list[_Req] = []
        self._running: list[_Seq] = []
        self._active: dict[str, _Req] = {}
        self._closing = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name=f"omnimini-engine-{name}", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------------------

    def check(self, req: EngineRequest) -> int:
        """Validate a request against the context and budget; return the KV tokens it will reserve."""
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            raise RequestTooLargeError("the prompt is empty")
        if n_prompt >= self.max_context:
            raise RequestTooLargeError(
                f"this model's maximum context length is {self.max_context} tokens; the prompt is {n_prompt} "
                f"tokens, leaving no room for the completion")
        if req.n < 1:
            raise ValueError(f"n must be >= 1, got {req.n}")
        if req.n > self.max_batch:
            raise RequestTooLargeError(f"n={req.n} exceeds the engine's batch size {self.max_batch}")
        if req.params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.params.max_tokens}")
        per_seq = min(n_prompt + req.params.max_tokens, self.max_context)
        reserve = per_seq * req.n
        if reserve > self.kv_budget:
            raise RequestTooLargeError(
                f"request needs {reserve} KV-cache tokens ({req.n} x {per_seq}); the engine's budget is "
                f"{self.kv_budget}")
        img = self.model.config.image_token_id
        n_ph = sum(1 for t in req.prompt_ids if t == img) if img is not None else 0
        if req.pixels is not None:
            need = self.model.image_token_count(req.pixels) if self.model.config.vision else 0
            if n_ph != need:
                # (a family that splits images sends each tile as one tower image)
                raise ValueError(f"prompt has {n_ph} image placeholders; {len(req.pixels)} images (tiles) "
                                 f"need {need}")
        elif n_ph:
            raise ValueError(f"prompt has {n_ph} image placeholder tokens but no images were given")
        return reserve

    def submit(self, req: EngineRequest, sink: Callable[[EngineEvent], None]) -> str:
        """Queue a request; `sink` is called (from the engine thread) with every EngineEvent."""
        reserve = self.check(req)
        if _BACKGROUND.get():
            req.priority = max(req.priority, 1)
        r = _Req(req, sink, self.vocab, reserve)
        if self.prefix_cache is not None:  # hashed here, in the caller's thread, not the engine's
            r.block_keys = self._block_keys(req)
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            self._inbox.append(r)
            self.stats.requests_total += 1
            self.stats.background_requests_total += req.priority > 0
            self.stats.prompt_tokens_total += len(r.prompt)
            self._cv.notify()
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its slots (a client that went away)."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    async def stream(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Async iterator of a request's events; closing it early (client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def sink(ev: EngineEvent) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        self.submit(req, sink)
        pending = _Pending(req.n)
        try:
            while pending.left:
                yield pending.check(await q.get())
        finally:
            if pending.left:
                self.abort(req.request_id)

    def stream_sync(self, req: EngineRequest) -> Iterator[EngineEvent]:
        """Blocking iterator of a request's events (terminal chat); leaving it early aborts the request."""
        q: queue.Queue[EngineEvent] = queue.Queue()
        self.submit(req, q.put)
        pending = _Pending(req.n)
        try:
            while pending.left:
                yield pending.check(q.get())
        finally:
            if pending.left:
                self.abort(req.request_id)

    def generate(self, requests: list[EngineRequest], timeout: float | None = None) -> list[GenerationResult]:
        """Blocking: run all requests through the batch together, return their results in order."""
        collectors = [_Collector(r) for r in requests]
        for c in collectors:
            self.submit(c.req, c.push)
        return [c.result(timeout) for c in collectors]

    def shutdown(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Take no new requests; finish in-flight ones (wait=True, up to `timeout`) or cancel them."""
        with self._cv:
            self._closing = True
            self._drain = wait
            self._cv.notify()
        self._thread.join(timeout if wait else 5.0)
        if self._thread.is_alive():
            with self._cv:
                self._drain = False
                self._cv.notify()
            self._thread.join(5.0)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closing

    # ---- the loop ---------------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._prefilling or self._running
                    or self._next_admissible() is not None)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            # measured: 2 OpenMP threads driven from a non-main Python thread decode ~2x slower than 1 here
            torch.set_num_threads(self.threads)
        self.ready.set()
        while True:
            with self._cv:
                while not self._has_work() and not self._closing:
                    self._cv.wait()
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
                if self._closing and not self._drain:
                    aborts |= set(self._active) | {r.id for r in self._waiting}
                idle = not (self._waiting or self._prefilling or self._running)
                if self._closing and idle and not aborts:
                    return
            for rid in aborts:
                self._abort(rid)
            try:
                self._admit()
                if self._prefilling:
                    self._prefill_step()
                if self._running:
                    self._decode_step()
            except Exception as e:  # a failing batch must not kill the engine: fail its requests
                log.exception("engine step failed")
                for r in list(self._active.values()):
                    self._fail(r, f"{type(e).__name__}: {e}")
            self.stats.waiting = len(self._waiting)
            self.stats.running = len(self._running)
            if not (self._waiting or self._prefilling or self._running):
                # idle: no slot holds a live sequence, so a cache grown for long prompts goes back to its start
                self.cache.shrink(KVCache.GROW)

    def _block_keys(self, req: EngineRequest) -> list[bytes]:
        cfg = self.model.config
        digests = [image_digest(p) for p in req.pixels] if req.pixels is not None else None
        tpi = cfg.vision.tokens_per_image if cfg.vision is not None else 0
        if isinstance(req.pixels, list):  # images of their own sizes: one key for all, on every image block
            digests, tpi = [b"".join(digests)], max(1, self.model.image_token_count(req.pixels))
        return block_keys(req.prompt_ids, self.prefix_cache.block_size, cfg.image_token_id, digests, tpi)

    def _can_admit(self, r: _Req) -> bool:
        keep = self._interactive_slots if r.req.priority > 0 else 0
        return len(self._free_slots) - keep >= len(r.seqs) and self._reserved + r.reserve <= self.kv_budget

    def _next_admissible(self) -> _Req | None:
        """The oldest waiting interactive request, else the oldest background one, if it fits now (FIFO within
        each class, so a large request is not starved by smaller ones behind it)."""
        head = next((r for r in self._waiting if r.req.priority == 0), None)
        if head is None:
            head = next(iter(self._waiting), None)
        return head if head is not None and self._can_admit(head) else None

    def _admit(self) -> None:
        while (r := self._next_admissible()) is not None:
            self._waiting.remove(r)
            for s in r.seqs:
                s.slot = self._free_slots.pop()
                s.utf8 = _Utf8()
            self._reserved += r.reserve
            self._active[r.id] = r
            if r.req.pixels is not None:
                r.image_from = first_image(r.prompt, self.model.config.image_token_id)
                try:
                    r.image_embeds = self.model.encode_images(r.req.pixels).flatten(0, -2)
                    if self.model.config.mrope_section is not None:
                        rope, delta = self.model.mrope_positions(torch.tensor([r.prompt]), r.req.pixels)
                        r.rope_positions, r.rope_delta = rope[0], int(delta[0])
                except Exception as e:
                    self._fail(r, f"image encoding failed: {e}")
                    continue
            self._prefilling.append(r)

    def _release(self, r: _Req) -> None:
        if self._active.pop(r.id, None) is None:
            return
        self._reserved -= r.reserve
        for s in r.seqs:
            if s.slot >= 0:
                self._free_slots.append(s.slot)
                s.slot = -1
        self._running = [s for s in self._running if s.req is not r]
        self._prefilling = [p for p in self._prefilling if p is not r]

    def _abort(self, rid: str) -> None:
        r = self._active.get(rid) or next((w for w in self._waiting if w.id == rid), None)
        if r is None:
            return
        if r in self._waiting:
            self._waiting.remove(r)
        self._release(r)
        for s in r.seqs:
            if s.finished is None:
                s.finished = "abort"
                self._emit(s, "", [], [], "abort")
        self._count_finish("abort")

    def _fail(self, r: _Req, message: str) -> None:
        self._release(r)
        for s in r.seqs:
            if s.finished is None:
                s.finished = "error"
                self._safe_sink(r, EngineEvent(r.id, s.index, finish_reason="error", error=message,
                                               prompt_tokens=len(r.prompt), completion_tokens=len(s.tokens)))
        self._count_finish("error")

    def _count_finish(self, reason: str) -> None:
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1

    # ---- prefill ----------------------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        budget = self.prefill_chunk
        batch: list[tuple[_Req, int, int]] = []
        for r in sorted(self._prefilling, key=lambda r: r.req.priority):  # stable: FIFO within a class
            if budget <= 0:
                break
            self._reuse_prefix(r)
            take = min(len(r.prompt) - r.prefilled, budget)
            if self.model.config.image_attention == "bidirectional":
                take = _keep_images_whole(r.prompt, r.prefilled, take, self.model.config.image_token_id)
            batch.append((r, r.prefilled, r.prefilled + take))
            budget -= take
        T = max(e - s for _, s, e in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(batch), T), dtype=torch.long)
        embeds = []
        img = self.model.config.image_token_id
        for i, (r, s, e) in enumerate(batch):
            ids[i, : e - s] = torch.tensor(r.prompt[s:e])
            pos[i] = torch.arange(s, s + T)  # pad tail: positions past the chunk, overwritten before being read
            if r.image_embeds is not None:
                before = sum(1 for t in r.prompt[:s] if t == img)
                inside = sum(1 for t in r.prompt[s:e] if t == img)
                if inside:
                    embeds.append(r.image_embeds[before: before + inside])
        slots = torch.tensor([r.seqs[0].slot for r, _, _ in batch])
        rope = None
        if any(r.rope_positions is not None for r, _, _ in batch):  # M-RoPE: the chunk's own coordinates
            rope = pos[..., None].repeat(1, 1, 3)
            for i, (r, s, e) in enumerate(batch):
                if r.rope_positions is not None:
                    rope[i] += r.rope_delta  # (the pad tail: any position, never read)
                    rope[i, : e - s] = r.rope_positions[s:e]
        out = self.model(ids, positions=pos, cache=self.cache, slots=slots,
                         image_embeds=torch.cat(embeds) if embeds else None,
                         image_from=self._image_from([r for r, _, _ in batch]), logits_for="last",
                         rope_positions=rope)
        last = torch.tensor([e - s - 1 for _, s, e in batch])
        h = out.hidden[torch.arange(len(batch)), last]
        logits = self.model.output_head(h[:, None])[:, 0].float()
        for i, (r, _s, e) in enumerate(batch):
            r.prefilled = e
            if self.prefix_cache is not None:
                self.prefix_cache.store(self.cache, r.seqs[0].slot, r.block_keys[: e // self.prefix_cache.block_size])
            if e == len(r.prompt):
                self._prefilling.remove(r)
                self._start_decoding(r, logits[i])

    def _reuse_prefix(self, r: _Req) -> None:
        """Copy pooled blocks that continue r's prompt into its slot. At least the last prompt token is always
        prefilled (its logits start decoding), so a fully pooled prompt still runs one token."""
        pc = self.prefix_cache
        if pc is None or r.prefilled % pc.block_size:
            return
        if r.prefilled == 0:
            pc.stats.queried_tokens += len(r.prompt)
        usable = (len(r.prompt) - 1) // pc.block_size
        got = pc.load(self.cache, r.seqs[0].slot, r.block_keys, r.prefilled // pc.block_size, usable)
        if got:
            r.prefilled += got * pc.block_size
            r.cached_tokens += got * pc.block_size
            pc.stats.hit_tokens += got * pc.block_size
            self.stats.prompt_tokens_cached_total += got * pc.block_size

    def _start_decoding(self, r: _Req, logits: torch.Tensor) -> None:
        n = len(r.prompt)
        first = r.seqs[0]
        for s in r.seqs[1:]:  # share the prompt: copy its KV rows instead of recomputing them
            for k, v in zip(self.cache.k, self.cache.v, strict=True):
                k[s.slot, :, :n] = k[first.slot, :, :n]
                v[s.slot, :, :n] = v[first.slot, :, :n]
        r.t_first = time.monotonic()
        self.stats.observe_ttft(r.t_first - r.t_submit)
        for s in r.seqs:
            if s.finished is None:  # a sibling's failure may have ended the whole request
                s.cached = n
                self._running.append(s)
                self._accept(s, logits)

    # ---- decode -----------------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        seqs = list(self._running)
        ids = torch.tensor([[s.pending] for s in seqs])
        pos = torch.tensor([[s.cached] for s in seqs])
        slots = torch.tensor([s.slot for s in seqs])
        image_from = self._image_from([s.req for s in seqs])
        deltas = torch.tensor([[s.req.rope_delta] for s in seqs])
        out = self.model(ids, positions=pos, cache=self.cache, slots=slots, image_from=image_from,
                         logits_for="last", rope_positions=pos + deltas if bool(deltas.any()) else None)
        logits = out.logits[:, -1].float()
        for i, s in enumerate(seqs):
            s.cached += 1
            if s.finished is None:
                self._accept(s, logits[i])

    def _image_from(self, reqs: list[_Req]) -> torch.Tensor | None:
        """Each row's first image position, for a model with image adapters when a row holds an image; else None
        (text rows compute as the text model does)."""
        if not self.model.config.image_adapter_dim or all(r.image_from == NO_IMAGE for r in reqs):
            return None
        return torch.tensor([r.image_from for r in reqs])

    def _accept(self, s: _Seq, logits: torch.Tensor) -> None:
        """Sample the next token of `s` from its logits row, emit text, decide whether it is finished."""
        p = s.req.params
        row = adjust_logits(logits, p, s.counts)
        if self._invalid is not None:
            row = row.masked_fill(self._invalid, float("-inf"))
        if s.grammar is not None:
            row = row.masked_fill(~s.grammar.allowed(row.shape[0]), float("-inf"))
        if p.ignore_eos and s.grammar is None:
            row[list(self.eos_ids)] = float("-inf")
        tok = sample_token(row, p, s.gen)
        if s.grammar is not None and not s.grammar.consume(tok):
            self._fail(s.req, f"grammar rejected token {tok}: {s.grammar.error}")
            return
        is_stop = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if is_stop:
            self._finish(s, "stop")
            return
        lp = [self._logprob(row, tok, p.top_logprobs)] if p.logprobs else []
        s.tokens.append(tok)
        s.pending = tok
        self.stats.generation_tokens_total += 1
        if s.counts is not None:
            s.counts[tok] += 1
        s.text += s.utf8.push(self.token_bytes[tok] if tok < len(self.token_bytes) else b"")
        if self._check_stop_strings(s, lp):
            return
        done = s.grammar is not None and s.grammar.finished
        if done or len(s.tokens) >= p.max_tokens or s.cached + 1 >= self.max_context:
            self._finish(s, "stop" if done else "length", lp, [tok])
            return
        self._emit_ready(s, lp)

    def _check_stop_strings(self, s: _Seq, lp: list[TokenLogprob]) -> bool:
        stops = s.req.params.stop
        if not stops:
            return False
        start = max(0, s.emitted - max(len(x) for x in stops))
        hits = [i for i in (s.text.find(x, start) for x in stops) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        s.text = s.text[:cut]
        s.emitted = min(s.emitted, cut)
        self._finish(s, "stop", lp, [s.tokens[-1]], flush=False)
        return True

    def _emit_ready(self, s: _Seq, lp: list[TokenLogprob]) -> None:
        hold = _holdback(s.text, s.req.params.stop) if s.req.params.stop else 0
        end = max(len(s.text) - hold, s.emitted)
        delta = s.text[s.emitted:end]
        s.emitted = end
        self._emit(s, delta, [s.tokens[-1]], lp, None)  # also when held back: consumers count tokens

    def _finish(self, s: _Seq, reason: str, lp: list[TokenLogprob] | None = None, toks: list[int] | None = None,
                flush: bool = True) -> None:
        if flush:
            s.text += s.utf8.flush()  # an unfinished UTF-8 character becomes U+FFFD
        delta = s.text[s.emitted:]
        s.emitted = len(s.text)
        s.finished = reason
        self._running = [x for x in self._running if x is not s]
        self._emit(s, delta, toks or [], lp or [], reason)
        r = s.req
        if all(x.finished for x in r.seqs):
            self._release(r)
            self._count_finish(reason)

    def _logprob(self, row: torch.Tensor, tok: int, top: int) -> TokenLogprob:
        lsm = row.log_softmax(-1)
        tb = self.token_bytes
        entry = TokenLogprob(tok, _tok_str(tb, tok), _finite(float(lsm[tok])), list(tb[tok]) if tok < len(tb) else [])
        if top:
            vals, idx = lsm.topk(min(top, lsm.shape[0]))
            entry.top = [(int(i), _tok_str(tb, int(i)), _finite(float(v)), list(tb[int(i)]) if int(i) < len(tb)
                          else []) for v, i in zip(vals, idx, strict=True)]
        return entry

    def _emit(self, s: _Seq, text: str, toks: list[int], lp: list[TokenLogprob], reason: str | None) -> None:
        r = s.req
        self._safe_sink(r, EngineEvent(r.id, s.index, text, toks, lp, reason, len(r.prompt), len(s.tokens),
                                       cached_tokens=r.cached_tokens))

    @staticmethod
    def _safe_sink(r: _Req, ev: EngineEvent) -> None:
        try:
            r.sink(ev)
        except Exception:  # a broken consumer must not break the loop
            log.exception("event sink failed for request %s", r.id)


# ---- helpers ------------------------------------------------------------------------------------------------

class _Pending:
    """Counts a streamed request's unfinished sequences; turns an error event into an exception."""

    def __init__(self, n: int):
        self.left = n

    def check(self, ev: EngineEvent) -> EngineEvent:
        if ev.finish_reason == "error":
            raise EngineError(ev.error or "generation failed")
        if ev.finish_reason is not None:
            self.left -= 1
        return ev


class _Utf8:
    """Incremental UTF-8 decoding of token bytes (a character may span tokens)."""

    def __init__(self):
        import codecs

        self._d = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, b: bytes) -> str:
        return self._d.decode(b)

    def flush(self) -> str:
        return self._d.decode(b"", final=True)


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (so it is held back)."""
    best = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(text)), best, -1):
            if text.endswith(st[:k]):
                best = k
                break
    return best


def _tok_str(tb: list[bytes], tok: int) -> str:
    return tb[tok].decode("utf-8", errors="replace") if tok < len(tb) else ""


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class _Collector:
    """Gathers a request's events for the synchronous API."""

    def __init__(self, req: EngineRequest):
        self.req = req
        self.done = threading.Event()
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.parts = [{"text": [], "toks": [], "lp": [], "reason": None} for _ in range(req.n)]
        self.error: str | None = None
        self.left = req.n
        self.cached_tokens = 0

    def push(self, ev: EngineEvent) -> None:
        p = self.parts[ev.index]
        p["text"].append(ev.text)
        p["toks"].extend(ev.token_ids)
        p["lp"].extend(ev.logprobs)
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
        if ev.finish_reason:
            p["reason"] = ev.finish_reason
            if ev.finish_reason == "error":
                self.error = ev.error
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def result(self, timeout: float | None) -> GenerationResult:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.req.request_id} did not finish in {timeout} s")
        if self.error:
            raise EngineError(self.error)
        comps = [Completion(i, "".join(p["text"]), p["toks"], p["reason"], p["lp"]) for i, p in enumerate(self.parts)]
        return GenerationResult(self.req.request_id, len(self.req.prompt_ids), comps, self.cached_tokens)


def _keep_images_whole(prompt: list[int], start: int, take: int, image_token: int) -> int:
    """A chunk length that does not end inside a run of image placeholders: the tokens of one image attend to each
    other both ways (image_attention="bidirectional"), so a chunk holds all of an image or none of it (it may
    then exceed the chunk budget by at most one image)."""
    end = start + take
    while end < len(prompt) and prompt[end - 1] == image_token and prompt[end] == image_token:
        end += 1
    return end - start
