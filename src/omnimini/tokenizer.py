"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the GPT-4o o200k pre-tokenisation pattern.

Our own tokenizers put the BPE vocabulary first and the special tokens right after it. Hugging Face model
directories and tiktoken rank files load into the same `Tokenizer` class, so the engine and the server never
care where a vocabulary came from.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from omnimini import chat_template as ct
from omnimini.chat_template import ChatTemplateError, TokenizerError

__all__ = [
    "O200K_PATTERN", "SPECIAL_TOKENS", "DEFAULT_EOS_TOKENS", "DEFAULT_CHAT_TEMPLATE", "Tokenizer",
    "IncrementalDecoder", "TokenizerError", "ChatTemplateError", "train_tokenizer_cli",
]

# The pre-tokenisation regex of tiktoken's o200k_base (GPT-4o): words keep one leading non-letter (usually a
# space) and English contractions, numbers split into groups of at most three digits, punctuation runs keep
# trailing newlines/slashes, and whitespace runs leave their last space to the following word.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image_start|>",
    "<|image|>",
    "<|image_end|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|pad|>",
)
DEFAULT_EOS_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
DEFAULT_CHAT_TEMPLATE = ct.DEFAULT_CHAT_TEMPLATE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel pre-tokenizers."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _byte_level_pipeline(tok: tokenizers.Tokenizer, pattern: str) -> None:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


def _add_specials(tok: tokenizers.Tokenizer) -> None:
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])


def _mentions(node: Any, type_name: str) -> bool:
    """Whether a tokenizer.json component tree contains a component of the given type."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the metadata chat and generation need (eos ids, template, image tokens)."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        chat_template: str | None = None,
        eos_tokens: Sequence[str] | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        image_token: str | None = "<|image|>",
        image_start: str | None = "<|image_start|>",
        image_end: str | None = "<|image_end|>",
        add_bos_token: bool = False,
        expand_image_token: bool = False,
        image_placeholder: str | None = None,
    ):
        self.hf = hf
        # the template writes one image placeholder per image (LLaVA): encode_chat repeats it per image token
        self.expand_image_token = expand_image_token
        # what the template writes for each image when that is not image_token itself (Gemma 3: <start_of_image>,
        # which its processor expands around the soft tokens)
        self.image_placeholder = image_placeholder
        self.add_bos_token = add_bos_token  # raw prompts start with BOS (SentencePiece GGUFs); chat templates say
        if eos_tokens is None:
            eos_tokens = [t for t in DEFAULT_EOS_TOKENS if hf.token_to_id(t) is not None]
        self.eos_tokens = list(eos_tokens)
        for name, tok in [("eos", t) for t in self.eos_tokens] + [("bos", bos_token), ("pad", pad_token)]:
            if tok is not None and hf.token_to_id(tok) is None:
                raise TokenizerError(f"{name} token {tok!r} is not in the vocabulary")
        self.bos_token, self.pad_token = bos_token, pad_token
        # Image markers are optional: a text-only vocabulary (most HF models) simply has none.
        self.image_token = image_token if image_token and hf.token_to_id(image_token) is not None else None
        self.image_start = image_start if image_start and hf.token_to_id(image_start) is not None else None
        self.image_end = image_end if image_end and hf.token_to_id(image_end) is not None else None
        if chat_template is None and hf.token_to_id("<|im_start|>") is not None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        self.chat_template = chat_template
        self._literal: tokenizers.Tokenizer | None = None  # clone that treats special tokens as plain text

    # ----------------------------------------------------------------- metadata
    @property
    def vocab_size(self) -> int:
        size = self.hf.get_vocab_size(with_added_tokens=True)
        added = self.hf.get_added_tokens_decoder()
        return max(size, max(added) + 1) if added else size

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.hf.token_to_id(t) for t in self.eos_tokens]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.hf.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int:
        if self.pad_token is not None:
            return self.hf.token_to_id(self.pad_token)
        eos = self.eos_token_ids
        return eos[0] if eos else 0  # padded positions are masked, so any valid id will do

    @property
    def image_token_id(self) -> int | None:
        return None if self.image_token is None else self.hf.token_to_id(self.image_token)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; no BOS is added. With allow_special=False, "<|im_end|>" in user text is
        tokenized as ordinary characters, so untrusted text cannot forge turn boundaries."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        tok = self.hf if allow_special else self._literal_tokenizer()
        return tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str, allow_special: bool = True) -> list[int]:
        """A raw (completion, embedding) prompt's ids: BOS first when the vocabulary asks for one (add_bos_token),
        as transformers and llama.cpp do; encode() itself never adds it."""
        ids = self.encode(text, allow_special)
        bos = self.bos_token_id
        if self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def _literal_tokenizer(self) -> tokenizers.Tokenizer:
        if self._literal is None:
            clone = tokenizers.Tokenizer.from_str(self.hf.to_str())
            clone.encode_special_tokens = True
            self._literal = clone
        return self._literal

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (special/added tokens: their UTF-8 text)."""
        return self.all_token_bytes()[token_id]

    def all_token_bytes(self) -> list[bytes]:
        return self._all_token_bytes

    @cached_property
    def _all_token_bytes(self) -> list[bytes]:
        # Component JSON only: serialising the whole tokenizer (vocab and merges) would cost seconds at 200k.
        parts = [c for c in (self.hf.pre_tokenizer, self.hf.decoder) if c is not None]
        byte_level = any(_mentions(json.loads(c.__getstate__()), "ByteLevel") for c in parts)
        if byte_level:
            def to_bytes(tok: str) -> bytes:
                try:
                    return bytes(CHAR_TO_BYTE[c] for c in tok)
                except KeyError:  # not a byte-level string (a stray added token): take its text
                    return tok.encode("utf-8")
        else:
            to_bytes = _sentencepiece_bytes
        out = [b""] * self.vocab_size  # ids missing from a sparse vocabulary stay empty
        for tok, i in self.hf.get_vocab(with_added_tokens=False).items():
            out[i] = to_bytes(tok)
        for i, added in self.hf.get_added_tokens_decoder().items():
            out[i] = added.content.encode("utf-8")
        return out

    # ----------------------------------------------------------------- chat
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, image_tokens: int = 0, **template_kwargs: Any) -> str:
        """Render a conversation as prompt text. Extra keyword arguments reach the template as variables
        (e.g. `enable_thinking` for Qwen3 templates, the API's `chat_template_kwargs`)."""
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json has none)")
        if image_tokens < 0:
            raise ChatTemplateError(f"image_tokens must be >= 0, got {image_tokens}")
        # omnimini's own template frames images with start/end tokens; a loaded VLM's template (SmolVLM's is ChatML
        # too) writes one placeholder per image that encode_chat expands
        ours = "<|im_start|>" in self.chat_template and self.image_token is not None and not self.expand_image_token
        images_in_messages = any(
            isinstance(m, dict) and isinstance(m.get("content"), list)
            and any(isinstance(p, dict) and p.get("type") in ct.IMAGE_PART_TYPES for p in m["content"])
            for m in messages
        ) if isinstance(messages, list) else False
        if images_in_messages and ours and (self.image_start is None or self.image_end is None):
            raise ChatTemplateError("the vocabulary lacks image start/end tokens")
        extra = {
            **template_kwargs,
            "image_tokens": image_tokens,
            "image_token": self.image_token or "",
            "image_start": self.image_start or "",
            "image_end": self.image_end or "",
        }
        return ct.render(
            self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_tokens[0] if self.eos_tokens else "",
            extra=extra, foreign=self.chat_template != DEFAULT_CHAT_TEMPLATE,
        )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, image_tokens: int = 0,
                    image_texts: list[str] | None = None, **template_kwargs: Any) -> list[int]:
        """image_texts: what the template's one placeholder per image becomes, image by image (Idefics3 frames
        each image's tiles with tokens of its own); without them the placeholder is repeated image_tokens times."""
        # Special-token text inside message content is encoded as special tokens too, as transformers and
        # vLLM do; callers that need stricter isolation must filter content first.
        text = self.render_chat(messages, tools, add_generation_prompt, image_tokens, **template_kwargs)
        if self.expand_image_token and self.image_token and image_texts is not None:
            placeholder = self.image_placeholder or self.image_token
            pieces = text.split(placeholder)
            if len(pieces) - 1 != len(image_texts):
                raise ChatTemplateError(f"the prompt has {len(pieces) - 1} {placeholder} placeholders for "
                                        f"{len(image_texts)} images")
            text = pieces[0] + "".join(t + p for t, p in zip(image_texts, pieces[1:], strict=True))
        elif self.expand_image_token and self.image_token and image_tokens > 1:
            text = text.replace(self.image_token, self.image_token * image_tokens)
        return self.encode(text, allow_special=True)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                     "normalized": t.normalized, "single_word": t.single_word}
            for i, t in sorted(self.hf.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "added_tokens_decoder": added,
            "omnimini": {
                "add_bos_token": self.add_bos_token,
                "expand_image_token": self.expand_image_token,
                "image_placeholder": self.image_placeholder,
                "eos_tokens": self.eos_tokens,
                "image_token": self.image_token,
                "image_start": self.image_start,
                "image_end": self.image_end,
            },
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load our own layout or a Hugging Face model directory (tokenizer.json + tokenizer_config.json)."""
        d = Path(directory)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: missing (a tokenizer directory needs tokenizer.json)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises bare Exception subclasses for bad JSON
            raise TokenizerError(f"{tok_file}: not a valid tokenizer.json ({e})") from e
        config = _read_json(d / "tokenizer_config.json") or {}
        own = config.get("omnimini")
        if isinstance(own, dict):
            return cls(hf, chat_template=config.get("chat_template"), eos_tokens=own.get("eos_tokens", []),
                       bos_token=_token_text(config.get("bos_token")), pad_token=_token_text(config.get("pad_token")),
                       image_token=own.get("image_token"), image_start=own.get("image_start"),
                       image_end=own.get("image_end"), add_bos_token=bool(own.get("add_bos_token", False)),
                       expand_image_token=bool(own.get("expand_image_token", False)),
                       image_placeholder=own.get("image_placeholder"))
        return cls(hf, chat_template=_hf_chat_template(d, config), eos_tokens=_hf_eos_tokens(d, hf, config),
                   bos_token=_present(hf, _token_text(config.get("bos_token"))),
                   pad_token=_present(hf, _token_text(config.get("pad_token"))),
                   image_token=None, image_start=None, image_end=None)

    # ----------------------------------------------------------------- construction
    @classmethod
    def train(cls, files: Sequence[str | os.PathLike], vocab_size: int, show_progress: bool = True) -> Tokenizer:
        """Train a byte-level BPE with the o200k pattern; `vocab_size` counts the special tokens too."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise TokenizerError(f"vocab_size must be at least {minimum} (256 bytes + specials), got {vocab_size}")
        if not files:
            raise TokenizerError("no training files given")
        for f in files:
            _check_training_file(Path(f))
        hf = tokenizers.Tokenizer(models.BPE())
        _byte_level_pipeline(hf, O200K_PATTERN)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=show_progress, special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train([str(f) for f in files], trainer)
        _add_specials(hf)  # after training, so their ids follow the BPE vocabulary
        return cls(hf, pad_token="<|pad|>")

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str = O200K_PATTERN) -> Tokenizer:
        """Load a tiktoken rank file (`base64token rank` per line) as an equivalent `tokenizers` BPE."""
        ranks = _read_tiktoken_ranks(Path(path))
        vocab = {"".join(BYTE_TO_CHAR[b] for b in tok): rank for tok, rank in ranks.items()}
        merges = []
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(tok) < 2:
                continue
            merge = _tiktoken_merge(ranks, tok, rank)
            if merge is not None:  # None: unreachable by merging; ignore_merges still finds it whole
                merges.append(tuple("".join(BYTE_TO_CHAR[b] for b in p) for p in merge))
        # ignore_merges=True mirrors tiktoken: a pre-token that is itself in the vocabulary is one token.
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        _byte_level_pipeline(hf, pattern)
        _add_specials(hf)
        return cls(hf, pad_token="<|pad|>")


# ----------------------------------------------------------------------------- helpers


def _sentencepiece_bytes(tok: str) -> bytes:
    """Bytes of a SentencePiece-style token: <0xAB> byte-fallback pieces and '▁' for spaces."""
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        try:
            return bytes([int(tok[3:5], 16)])
        except ValueError:
            pass
    return tok.replace("\u2581", " ").encode("utf-8")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """HF configs store special tokens as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _present(hf: tokenizers.Tokenizer, token: str | None) -> str | None:
    return token if token is not None and hf.token_to_id(token) is not None else None


def _hf_chat_template(d: Path, config: dict) -> str | None:
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older named-template format: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        template = (_read_json(d / "chat_template.json") or {}).get("chat_template")
    return template if isinstance(template, str) else None


def _hf_eos_tokens(d: Path, hf: tokenizers.Tokenizer, config: dict) -> list[str]:
    eos = []
    first = _present(hf, _token_text(config.get("eos_token")))
    if first:
        eos.append(first)
    gen_ids = (_read_json(d / "generation_config.json") or {}).get("eos_token_id")
    if isinstance(gen_ids, int):
        gen_ids = [gen_ids]
    for i in gen_ids or []:
        tok = hf.id_to_token(i) if isinstance(i, int) else None
        if tok is not None and tok not in eos:
            eos.append(tok)
    return eos


def _check_training_file(path: Path) -> None:
    """Fail early, naming the file, on what the Rust trainer would report vaguely or silently skip."""
    if not path.is_file():
        raise TokenizerError(f"{path}: training file not found")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, text_seen = 0, False
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"{path}: not valid UTF-8 text (bad byte at offset {offset + e.start})"
                ) from e
            text_seen = text_seen or bool(text.strip())
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not valid UTF-8 text (truncated character at the end)") from e
    if not text_seen:
        raise TokenizerError(f"{path}: training file is empty")


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise TokenizerError(f"{path}: tiktoken rank file not found")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:  # binascii.Error is a ValueError
                raise TokenizerError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path}: tiktoken rank file is empty")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: rank file lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]})")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: rank file has duplicate ranks")
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: float) -> list[bytes]:
    """Run tiktoken's BPE on `token`'s bytes, merging only pairs ranked below `max_rank`, until two parts
    remain: the merge that creates `token`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _tiktoken_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes] | None:
    parts = _bpe_parts(ranks, token, rank)
    if len(parts) != 2:
        # Hand-made files can rank a token below one of its parts; tiktoken then reaches it only through
        # the higher-ranked part, so take the split it arrives at when every rank is allowed.
        parts = _bpe_parts(ranks, token, float("inf"))
    return (parts[0], parts[1]) if len(parts) == 2 else None


class IncrementalDecoder:
    """Streams text token by token, holding back bytes of a UTF-8 character that is not yet complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_token_ids if skip_special else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever bytes are still pending become U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def train_tokenizer_cli(files: Sequence[str], vocab_size: int, out_dir: str) -> Tokenizer:
    """`omnimini tokenizer train`: train, save to `out_dir`, print a one-line summary."""
    tok = Tokenizer.train(files, vocab_size, show_progress=True)
    tok.save(out_dir)
    print(f"trained tokenizer: {tok.vocab_size} tokens ({len(SPECIAL_TOKENS)} special) -> {out_dir}")
    return tok
