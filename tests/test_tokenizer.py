"""Tokenizer: byte-level BPE round trips, special tokens, chat template, persistence, tiktoken parity."""

from __future__ import annotations

import base64
import json
import random

import pytest

from omnimini.tokenizer import (
    BYTE_TO_CHAR,
    O200K_PATTERN,
    SPECIAL_TOKENS,
    ChatTemplateError,
    IncrementalDecoder,
    Tokenizer,
    TokenizerError,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog while we're reading THE NEWS and DON'T stop "
    "def main(): return x + 1 # comment for i in range(10): print(i) 3.14159 2024-06-01 "
    "naïve café résumé über straße 日本語のテキスト 中文分词 한국어 🙂 🚀 👍🏽 مرحبا بالعالم שלום "
    "हिन्दी नमस्ते Ελληνικά русский текст"
).split()

# Code-point ranges for random text: ASCII, Latin-1, combining marks, Greek/Cyrillic, Hebrew/Arabic (RTL),
# Devanagari, CJK, Hangul, emoji and other astral-plane symbols, plus C0/C1 controls. No surrogates.
RANGES = [(0x00, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
          (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F6FF), (0x1D400, 0x1D4FF),
          (0xE000, 0xE0FF), (0xFFF0, 0xFFFD), (0x10FFF0, 0x10FFFF)]


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        lo, hi = rng.choice(RANGES)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train([corpus], vocab_size=480, show_progress=False)


SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand\x00nul \x07bell \x1b[31mansi\x1b[0m \x85 \u2028",
    "I'm HERE, they'RE there, WE'LL see. DON'T you've",
    "12345678901234567890 3.14 -7 1,000,000",
    "emoji 🙂🚀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "CJK 日本語のテキスト 中文分词 한국어",
    "combining e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0327\u0316a\u0336l\u0334g\u0337o",
    "RTL مرحبا بالعالم שלום עולם \u202eoverride\u202c",
    "Devanagari नमस्ते हिन्दी",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # ok\n",
    "astral \U0001d400\U0001d401 private \ue000 nonchar \ufffe\uffff max \U0010ffff",
]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_samples(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_roundtrip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 40))
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_training_learned_merges(tok):
    # A real BPE: frequent corpus words compress well below one token per byte.
    ids = tok.encode(" the quick brown fox")
    assert len(ids) < len(" the quick brown fox") // 2
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 480


def test_arbitrary_bytes_through_token_bytes(tok):
    table = tok.all_token_bytes()
    assert len(table) == tok.vocab_size
    assert table is tok.all_token_bytes()  # cached
    byte_ids = {}
    for b in range(256):
        i = tok.token_to_id(BYTE_TO_CHAR[b])
        assert i is not None and table[i] == bytes([b])
        byte_ids[b] = i
    rng = random.Random(2)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        ids = [byte_ids[b] for b in data]
        assert b"".join(tok.token_bytes(i) for i in ids) == data
        dec = IncrementalDecoder(tok)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == data.decode("utf-8", errors="replace")


def test_merged_token_bytes_are_concatenations(tok):
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    for merge in merges[:50]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        ab = tok.token_to_id(a + b)
        assert tok.token_bytes(ab) == tok.token_bytes(tok.token_to_id(a)) + tok.token_bytes(tok.token_to_id(b))


# ----------------------------------------------------------------------------- special tokens


def test_special_tokens_ids_follow_vocab(tok):
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    base = tok.vocab_size - len(SPECIAL_TOKENS)
    assert ids == list(range(base, tok.vocab_size))
    for t, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(t) == [i]
        assert tok.id_to_token(i) == t
        assert tok.token_bytes(i) == t.encode()
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert tok.pad_token_id == tok.token_to_id("<|pad|>")
    assert tok.image_token_id == tok.token_to_id("<|image|>")
    assert tok.bos_token_id is None


def test_special_tokens_inside_text(tok):
    text = "hi<|im_end|>\n<|image|><|image|>there"
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id("<|im_end|>")) == 1
    assert ids.count(tok.image_token_id) == 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "hi\nthere"


def test_allow_special_false_treats_markers_as_text(tok):
    ids = tok.encode("say <|im_end|> now", allow_special=False)
    assert not set(ids) & {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.decode(ids) == "say <|im_end|> now"
    assert tok.encode("<|im_end|>") == [tok.token_to_id("<|im_end|>")]  # the default path is unaffected


def test_encode_rejects_non_str(tok):
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- chat template

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup", "arguments": "{\"query\": \"cat\", \"n\": 2}"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a small cat"},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Search.",
                                            "parameters": {"type": "object"}}}]
EXPECTED = (
    "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more of these functions:\n"
    '[{"type": "function", "function": {"name": "lookup", "description": "Search.", '
    '"parameters": {"type": "object"}}}]\n'
    'To call a function, answer with <|tool_call|>{"name": <function-name>, "arguments": <args-json-object>}'
    "<|/tool_call|> for each call.<|im_end|>\n"
    "<|im_start|>user\nWhat is in this picture?<|image_start|><|image|><|image|><|image|><|image_end|>"
    "<|im_end|>\n"
    '<|im_start|>assistant\n<|tool_call|>{"name": "lookup", "arguments": {"query": "cat", "n": 2}}'
    "<|/tool_call|><|im_end|>\n"
    "<|im_start|>tool\na small cat<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_chat_template_exact(tok):
    assert tok.render_chat(CONVERSATION, tools=TOOLS, image_tokens=3) == EXPECTED


def test_chat_template_variants(tok):
    msgs = [{"role": "developer", "content": "Dev."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "developer", "content": "Later."}]
    assert tok.render_chat(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nDev.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>system\nLater.<|im_end|>\n"
    )
    assert tok.render_chat([{"role": "user", "content": [{"type": "image"}]}]) == (
        "<|im_start|>user\n<|image_start|><|image_end|><|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_chat_uses_single_special_ids(tok):
    ids = tok.encode_chat(CONVERSATION, tools=TOOLS, image_tokens=5)
    assert ids.count(tok.image_token_id) == 5
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5
    assert ids.count(tok.token_to_id("<|tool_call|>")) == 2  # the instruction and the call
    assert tok.decode(ids) == tok.render_chat(CONVERSATION, tools=TOOLS, image_tokens=5)


@pytest.mark.parametrize("bad, match", [
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "audio"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
])
def test_chat_bad_messages(tok, bad, match):
    with pytest.raises(ChatTemplateError, match=match):
        tok.render_chat(bad)


def test_foreign_template_flattens_text_and_rejects_images(tok):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content | trim }}{{ '\\n' }}"
        "{% endfor %}{% if tools %}TOOLS={{ tools | tojson }}{% endif %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    foreign = Tokenizer(tok.hf, chat_template=template, bos_token="<|endoftext|>")
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": None}]
    assert foreign.render_chat(msgs, tools=[{"x": "é"}]) == (
        '<|endoftext|>SYSTEM: ab\nUSER: q\nASSISTANT: \nTOOLS=[{"x": "é"}]ASSISTANT:'
    )
    with pytest.raises(ChatTemplateError, match="no image support"):
        foreign.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_foreign_template_helpers(tok):
    template = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}" \
               "{{ strftime_now('%Y') | length }}{% generation %}{{ messages[0].content }}{% endgeneration %}"
    foreign = Tokenizer(tok.hf, chat_template=template)
    assert foreign.render_chat([{"role": "user", "content": "x"}]) == "4x"
    thinking = Tokenizer(tok.hf, chat_template="{{ 'T' if enable_thinking else 'F' }}")
    assert thinking.render_chat([], enable_thinking=True) == "T"
    assert thinking.render_chat([]) == "F"
    with pytest.raises(ChatTemplateError, match="only one message"):
        foreign.render_chat([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(ChatTemplateError, match="syntax"):
        Tokenizer(tok.hf, chat_template="{% if %}").render_chat([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------- persistence


def test_save_from_dir_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|pad|>"
    assert config["omnimini"]["eos_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    loaded = Tokenizer.from_dir(tmp_path)
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eos_token_ids == tok.eos_token_ids
    assert loaded.pad_token_id == tok.pad_token_id
    assert loaded.image_token_id == tok.image_token_id
    assert loaded.render_chat(CONVERSATION, tools=TOOLS, image_tokens=3) == EXPECTED
    assert loaded.all_token_bytes() == tok.all_token_bytes()


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "Hello 日本 🙂<|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.render_chat(msgs)


def test_from_hf_model_dir(tok, tmp_path):
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True},
        "bos_token": None,
        "pad_token": "<|pad|>",
        "added_tokens_decoder": {str(im_end): {"content": "<|im_end|>", "special": True}},
    }))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.eos_token_ids == [im_end, eot]
    assert loaded.pad_token_id == tok.token_to_id("<|pad|>")
    assert loaded.image_token_id is None
    assert loaded.render_chat([{"role": "user", "content": [{"type": "text", "text": "hey"}]}]) == "<user>hey"


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_hf_dir_without_template(tok, tmp_path):
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_dir(tmp_path)
    # Our special tokens are in this vocabulary, so the default template applies.
    assert plain.render_chat([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx")
    assert plain.eos_token_ids == []


# ----------------------------------------------------------------------------- training errors


def test_train_empty_file_names_it(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty.txt"):
        Tokenizer.train([str(empty)], 300, show_progress=False)


def test_train_bad_files(tmp_path):
    bad = tmp_path / "binary.bin"
    bad.write_bytes(b"ok text \xff\xfe more")
    with pytest.raises(TokenizerError, match=r"binary\.bin.*UTF-8"):
        Tokenizer.train([str(bad)], 300, show_progress=False)
    with pytest.raises(TokenizerError, match="missing.txt"):
        Tokenizer.train([str(tmp_path / "missing.txt")], 300, show_progress=False)
    good = tmp_path / "good.txt"
    good.write_text("hello")
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train([str(good)], 100, show_progress=False)


# ----------------------------------------------------------------------------- tiktoken


def _ranks_from(tok: Tokenizer) -> dict[bytes, int]:
    """A tiktoken rank table equivalent to a trained BPE: the 256 bytes, then merged tokens in merge order."""
    ranks = {bytes([b]): b for b in range(256)}
    char_to_byte = {c: b for b, c in BYTE_TO_CHAR.items()}
    for merge in json.loads(tok.hf.to_str())["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(char_to_byte[c] for c in a + b)
        ranks.setdefault(token, len(ranks))
    return ranks


def test_tiktoken_parity(tok, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = _ranks_from(tok)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    reference = tiktoken.Encoding("tiny", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = Tokenizer.from_tiktoken(path)

    rng = random.Random(3)
    texts = list(SAMPLES) + [" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(100)]
    texts += [random_text(rng, rng.randint(1, 30)) for _ in range(100)]
    texts += ["".join(rng.choice(["the", " ", "  ", "\n", "DON'T", "é", "12345", "!!", "🙂", "\t"])
                      for _ in range(30)) for _ in range(100)]
    for text in texts:
        assert ours.encode(text, allow_special=False) == reference.encode_ordinary(text), repr(text)
    assert ours.token_to_id("<|endoftext|>") == len(ranks)
    assert ours.all_token_bytes()[: len(ranks)] == [reference.decode_single_token_bytes(i) for i in range(len(ranks))]


def test_tiktoken_bad_file(tmp_path):
    path = tmp_path / "broken.tiktoken"
    path.write_text("!!notbase64 0\n")
    with pytest.raises(TokenizerError, match="broken.tiktoken"):
        Tokenizer.from_tiktoken(path)
    path.write_text(f"{base64.b64encode(b'a').decode()} 0\n")
    with pytest.raises(TokenizerError, match="single-byte"):
        Tokenizer.from_tiktoken(path)


# ----------------------------------------------------------------------------- streaming


def test_incremental_decoder_multibyte_split(tok):
    # Single-byte tokens split every multi-byte character across tokens.
    text = "é日🙂👍🏽x"
    ids = [tok.token_to_id(BYTE_TO_CHAR[b]) for b in text.encode()]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    # Nothing is emitted mid-character: é is 2 bytes, so the first push holds it back.
    assert pieces[0] == "" and pieces[1] == "é"
    assert pieces[2] == pieces[3] == "" and pieces[4] == "日"


def test_incremental_decoder_matches_decode(tok):
    rng = random.Random(4)
    for _ in range(50):
        text = random_text(rng, 20) + "<|im_end|>"
        ids = tok.encode(text)
        dec = IncrementalDecoder(tok)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)
        dec = IncrementalDecoder(tok, skip_special=True)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids, skip_special=True)


def test_incremental_decoder_flush_incomplete(tok):
    dec = IncrementalDecoder(tok)
    first = "🙂".encode()[:2]
    assert dec.push(tok.token_to_id(BYTE_TO_CHAR[first[0]])) == ""
    assert dec.push(tok.token_to_id(BYTE_TO_CHAR[first[1]])) == ""
    assert dec.flush() == "\ufffd"


def _write_ranks(path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_tiktoken_parity_irregular_ranks(tmp_path):
    """Hand-made rank files: tokens ranked below one of their parts, and tokens no merge sequence reaches."""
    tiktoken = pytest.importorskip("tiktoken")
    base = {bytes([b]): b for b in range(256)}
    # b"bbba" (257) can only form as b"bb" + b"ba", and b"ba" ranks after it (258).
    cases = [{**base, b"bb": 256, b"bbba": 257, b"ba": 258, b"abc": 259}]
    for seed in range(6):
        rng = random.Random(seed)
        ranks, pool = dict(base), [b"a", b"b", b"c", b" "]
        for _ in range(60):
            t = rng.choice(pool) + rng.choice(pool)
            if t not in ranks:
                ranks[t] = len(ranks)
                pool.append(t)
        cases.append(ranks)
    rng = random.Random(5)
    for n, ranks in enumerate(cases):
        path = tmp_path / f"irregular{n}.tiktoken"
        _write_ranks(path, ranks)
        ours = Tokenizer.from_tiktoken(path)
        ref = tiktoken.Encoding(f"irregular{n}", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
        texts = ["bbba", "abc", "abcd", "bbbab cab"]
        texts += ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 25))) for _ in range(150)]
        for text in texts:
            assert ours.encode(text, allow_special=False) == ref.encode_ordinary(text), (n, text)


@pytest.mark.slow
def test_tiktoken_parity_real_text(tmp_path):
    """A 30k-token vocabulary trained on the shared text data, compared on a web-text sample."""
    tiktoken = pytest.importorskip("tiktoken")
    import os
    from pathlib import Path

    data = Path(os.environ.get("OMNIMINI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "text"
    if not (data / "wiki_demo.txt").is_file():
        pytest.skip(f"shared data not found at {data}")
    trained = Tokenizer.train([str(data / "wiki_demo.txt"), str(data / "tinyshakespeare.txt")], 30000,
                              show_progress=False)
    ranks = _ranks_from(trained)
    _write_ranks(tmp_path / "big.tiktoken", ranks)
    ours = Tokenizer.from_tiktoken(tmp_path / "big.tiktoken")
    ref = tiktoken.Encoding("big", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    text = (data / "c4_demo.jsonl").read_text(encoding="utf-8")
    assert ours.encode(text, allow_special=False) == ref.encode_ordinary(text)


def test_train_tokenizer_cli(corpus, tmp_path, capsys):
    from omnimini.tokenizer import train_tokenizer_cli

    out = tmp_path / "tok"
    trained = train_tokenizer_cli([corpus], 320, str(out))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert "320 tokens" in capsys.readouterr().out
    assert Tokenizer.from_dir(out).encode("the fox") == trained.encode("the fox")
    assert len(trained) == 320
