"""Log-likelihood scoring at the prefill limit: each context is run once for all of its continuations.

A multiple-choice item is one context and k continuations. Running context+continuation as k full rows does
the context's work k times and projects every position onto the vocabulary; here

* requests with the same (truncated) context tokens form a group whose context is forwarded once, with a KV
  cache, and only the last context position gets logits: that row scores every continuation's first token
  (so single-token continuations, MMLU's " A"/" B"/..., cost one context forward and nothing else);
* the rest of each multi-token continuation is forwarded after the cached context (continuation j of every
  group in one pass, overwriting the previous pass's positions: no cache copies), with logits only at the
  positions whose next token is scored;
* groups are sorted by length and packed into batches by a padded-token budget, not a fixed row count;
  scores are returned in the order of the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    prefix: list[int]  # the context's tokens (after left truncation), shared by every member
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation tokens)

    def cost(self) -> int:
        """Tokens this group adds to a forward: its context once plus each continuation's tail."""
        return len(self.prefix) + sum(max(len(c) - 1, 0) for _, c in self.members)


@dataclass
class ScoreStats:
    tokens: int = 0  # context + continuation tokens run through the model (no padding)
    truncated: int = 0  # requests whose context was cut from the left to fit the model's context
    batches: int = 0


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing whitespace of the context moves to the continuation, the pair is
    encoded jointly and split at the context's own token count, so a continuation whose first token merges with
    the context's end still scores exactly the tokens after the context's. An empty context is one EOS token."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        bos = tok.bos_token_id
        ctx = [bos if bos is not None else tok.eos_token_ids[0]]
        return ctx, tok.encode(continuation)
    ctx = tok.encode_prompt(context)
    whole = tok.encode_prompt(context + continuation)
    return ctx, whole[len(ctx):]


def fit_to_context(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """The model reads at most max_len tokens, the last scored token being only a target (max_len + 1 in all, as
    lm-evaluation-harness does): cut the context from the left; a continuation longer than that keeps its end."""
    if len(ctx) + len(cont) <= max_len + 1:
        return ctx, cont, False
    whole = (ctx + cont)[-(max_len + 1):]
    n_cont = min(len(cont), max_len)
    return whole[:-n_cont], whole[-n_cont:], True


def group_requests(prepared: list[tuple[list[int], list[int]]]) -> list[Group]:
    groups: dict[tuple[int, ...], Group] = {}
    for i, (ctx, cont) in enumerate(prepared):
        key = tuple(ctx)
        groups.setdefault(key, Group(list(ctx))).members.append((i, cont))
    return list(groups.values())


def plan_batches(groups: list[Group], token_budget: int) -> list[list[Group]]:
    """Longest contexts first (the biggest batch runs first, so a memory problem shows at once); a batch takes
    groups while rows x longest context + continuation tokens stays within the budget (at least one group)."""
    batches: list[list[Group]] = []
    cur: list[Group] = []
    longest = tail = 0
    for g in sorted(groups, key=lambda g: (-len(g.prefix), -g.cost())):
        g_tail = g.cost() - len(g.prefix)
        new_longest = max(longest, len(g.prefix))
        if cur and new_longest * (len(cur) + 1) + tail + g_tail > token_budget:
            batches.append(cur)
            cur, longest, tail = [], 0, 0
            new_longest = len(g.prefix)
        cur.append(g)
        longest, tail = new_longest, tail + g_tail
    if cur:
        batches.append(cur)
    return batches


def _gather(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """log p(target) for each row of [N, vocab] logits (float32 log-softmax over N rows only)."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0]


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    real = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])
    return ids, real


def score_batch(model, batch: list[Group], scores: list[float], pad: int = 0) -> None:
    """Fill scores[request index] for every member of the batch's groups."""
    ids, real = _padded([g.prefix for g in batch], pad)
    last = torch.zeros_like(real)
    last[torch.arange(len(batch)), torch.tensor([len(g.prefix) - 1 for g in batch])] = True
    tails = [[c for _, c in g.members if len(c) > 1] for g in batch]
    n_pass = max(len(t) for t in tails)
    cache = None
    if n_pass:  # the continuations' tails attend to the context through its KV cache
        longest_tail = max(len(c) - 1 for t in tails for c in t)
        cache = model.new_cache(len(batch), ids.shape[1] + longest_tail)
        positions = torch.arange(ids.shape[1]).expand(len(batch), -1)
        first = model(ids, positions=positions, cache=cache, logits_for=last).logits
    else:  # right padding is invisible to causal attention: the plain (fast) causal path
        first = model(ids, logits_for=last).logits
    rows = [b for b, g in enumerate(batch) for _ in g.members]
    firsts = [c[0] if c else pad for g in batch for _, c in g.members]
    first_lp = _gather(first[rows], firsts).tolist()
    k = 0
    for g in batch:
        for i, c in g.members:
            scores[i] = first_lp[k] if c else 0.0
            k += 1
    for j in range(n_pass):  # pass j: the j-th multi-token continuation of every group that has one
        todo = [(b, i, c) for b, g in enumerate(batch)
                for i, c in [m for m in g.members if len(m[1]) > 1][j:j + 1]]
        slots = torch.tensor([b for b, _, _ in todo])
        tail_ids, tail_real = _padded([c[:-1] for _, _, c in todo], pad)
        start = torch.tensor([len(batch[b].prefix) for b, _, _ in todo])
        positions = start[:, None] + torch.arange(tail_ids.shape[1])[None, :]
        logits = model(tail_ids, positions=positions, cache=cache, slots=slots, logits_for=tail_real).logits
        lp = _gather(logits, [t for _, _, c in todo for t in c[1:]])  # mask order = row-major = this order
        k = 0
        for _, i, c in todo:
            scores[i] += float(lp[k:k + len(c) - 1].sum())
            k += len(c) - 1


def score_requests(model, tok, requests: list[tuple[str, str]], token_budget: int = 4096,
                   progress=None) -> tuple[list[float], ScoreStats]:
    """(context, continuation) strings -> summed continuation log-probs, in request order."""
    stats = ScoreStats()
    max_len = model.config.max_seq_len
    prepared = []
    for context, cont in requests:
        ctx, c, cut = fit_to_context(*encode_pair(tok, context, cont), max_len)
        stats.truncated += cut
        prepared.append((ctx, c))
    scores = [0.0] * len(requests)
    pad = tok.pad_token_id
    for batch in plan_batches(group_requests(prepared), token_budget):
        score_batch(model, batch, scores, pad)
        stats.batches += 1
        n_tok = sum(g.cost() + len(g.members) for g in batch)  # + each continuation's last (target) token
        stats.tokens += n_tok
        if progress is not None:
            progress(sum(len(g.members) for g in batch), n_tok)
    return scores, stats
