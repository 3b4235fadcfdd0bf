"""SentencePiece-style GGUF vocabularies (tokenizer.ggml.model == "llama") as a `tokenizers` BPE.

A GGUF stores such a vocabulary as pieces with scores and token types, no merges. Encoding a SentencePiece BPE
model merges, again and again, the adjacent pair whose joined piece scores best; a BPE whose merge list is every
split of every piece into two pieces of the vocabulary, ranked by the joined piece's score, makes the same
choices. Characters with no piece fall back to their UTF-8 bytes as <0xNN> tokens; spaces are written '▁'.

This follows how transformers builds its tokenizer from these files (checked token for token in the tests):
- llama-style: '▁' is prepended to the text (unless the file says add_space_prefix = false), spaces become '▁';
- gemma (gemma, gemma2, gemma3 files): no prefix; pieces made only of spaces are stored as real spaces and stand
  for '▁' runs; merges are ranked by the order of the pieces in the file (Gemma's scores do not follow it);
- phi3: the prefix comes from a normalizer (a text starting with spaces keeps all of them).
Control tokens (type 3) are special; user-defined ones (type 4) match whole in raw text.
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"
# Gemma's turn format, for Gemma files that carry no chat template (base models): a system message opens the
# first user turn, the assistant is "model"; text parts of list contents are joined
GEMMA_CHAT_TEMPLATE = (  # one line, so no whitespace control is needed (it would eat the newlines)
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] ~ '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first %}{{ first }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] | trim }}{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
CONTROL, USER_DEFINED = 3, 4


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two vocabulary pieces, the best-scoring joined piece first; among equal scores
    the longer left part, then the longer right part, then the order built (pieces as listed, splits by id)."""
    ranked = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in splits)
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)  # stable: ties keep the order built above
    return [(m[3], m[4]) for m in ranked]


def sentencepiece_from_gguf(meta: dict) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` of a GGUF's SentencePiece-style vocabulary (special tokens added)."""
    arch = meta.get("general.architecture", "")
    raw = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(raw))
    gemma = arch in GEMMA_ARCHS
    tokens = [SPACE * len(t) if gemma and " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated piece keeps its last id, as transformers does
    if gemma:
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        file_scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        scores = dict(zip(tokens, (float(s) for s in file_scores), strict=True))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if gemma and unk_id is not None else None
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges(vocab, scores), unk_token=unk, fuse_unk=True,
                                         byte_fallback=True))
    spell = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        hf.normalizer = normalizers.Replace(" ", SPACE)
        hf.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        hf.decoder = decoders.Sequence(spell)
    elif arch == "phi3":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        hf.decoder = decoders.Sequence(spell + [decoders.Strip(content=" ", left=1)])
    else:
        # transformers prepends '▁' whatever add_space_prefix says; llama.cpp honours a false: so do we
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if prefix else "never",
                                                    split=False)
        hf.decoder = decoders.Sequence(spell + [decoders.Strip(content=" ", left=1)] if prefix else spell)
    control = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, k in zip(raw, types, strict=True) if k == CONTROL]
    # a respelled whitespace piece stays an ordinary piece (its raw spelling is no longer in the vocabulary)
    user = [tokenizers.AddedToken(t, special=False, normalized=False)
            for t, k in zip(raw, types, strict=True) if k == USER_DEFINED and t in vocab]
    hf.add_special_tokens(control)
    hf.add_tokens(user)
    return hf
