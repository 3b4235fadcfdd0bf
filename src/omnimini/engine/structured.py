"""Structured output: JSON mode, JSON Schema and forced tool calls, enforced token by token with llguidance.

A `Constraint` is compiled (and validated) once per request, before the request reaches the scheduler, so an
invalid schema is a clear error instead of a stuck generation. Each sequence then gets its own `GrammarState`
(an `LLMatcher`) that yields the allowed-token mask before every sampling step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

# Compact JSON (no free whitespace): a weak or random model cannot wander into endless blank space, and the
# output is what OpenAI's strict mode returns anyway.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A response_format / tool schema that cannot be turned into a grammar."""


_LLTOK_CACHE: dict[int, tuple[Any, LLTokenizer]] = {}
_LLTOK_LOCK = threading.Lock()


def ll_tokenizer(tokenizer) -> LLTokenizer:
    """The llguidance view of one of our tokenizers (built once per tokenizer: it takes ~0.1-1 s)."""
    with _LLTOK_LOCK:
        hit = _LLTOK_CACHE.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        eos = list(tokenizer.eos_token_ids) or None
        llt = LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos)
        _LLTOK_CACHE[id(tokenizer)] = (tokenizer, llt)
        return llt


def json_object_grammar() -> str:
    return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)


def json_schema_grammar(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("json_schema.schema must be a JSON object")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def lark_grammar(lark: str) -> str:
    return LLMatcher.grammar_from_lark(lark)


@dataclass
class Constraint:
    """A validated llguidance grammar plus the tokenizer view it runs against."""

    grammar: str
    lltok: LLTokenizer
    description: str = "grammar"

    def new_state(self) -> GrammarState:
        return GrammarState(LLMatcher(self.lltok, self.grammar, log_level=0), self.lltok.vocab_size)


def compile_constraint(tokenizer, grammar: str, description: str = "grammar") -> Constraint:
    """Validate `grammar` against `tokenizer`; raise GrammarError naming the problem."""
    lltok = ll_tokenizer(tokenizer)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        raise GrammarError(f"invalid {description}: {messages[0] if messages else 'rejected by llguidance'}")
    m = LLMatcher(lltok, grammar, log_level=0)
    if m.is_error():
        raise GrammarError(f"invalid {description}: {m.get_error()}")
    return Constraint(grammar, lltok, description)


def schema_constraint(tokenizer, schema: Any) -> Constraint:
    return compile_constraint(tokenizer, json_schema_grammar(schema), "json_schema")


def json_object_constraint(tokenizer) -> Constraint:
    return compile_constraint(tokenizer, json_object_grammar(), "json_object grammar")


class GrammarState:
    """One sequence's position in the grammar."""

    def __init__(self, matcher: LLMatcher, grammar_vocab: int):
        self.matcher = matcher
        self.grammar_vocab = grammar_vocab

    def allowed(self, vocab: int) -> torch.Tensor:
        """Bool mask [vocab] of the tokens the grammar accepts next (ids past the tokenizer: never)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.grammar_vocab].astype(bool)
        out = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, mask.shape[0])
        out[:n] = torch.from_numpy(mask[:n])
        return out

    def consume(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete: only end-of-sequence may follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


def dumps_schema(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"))
