"""SentencePiece-style GGUF vocabularies (tokenizer.ggml.model == "llama"): built from the file's pieces, scores
and token types, token for token equal to transformers' tokenizer built from the same file, and round trips."""

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from omnimini.weights.gguf_loader import metadata, open_gguf, tokenizer_from_gguf  # noqa: E402

CORPUS = ["Hello world, this is a test of the tokenizer.", "Café naïve résumé — déjà vu! Ça va?",
          "日本語のテキストと中文文本，한국어", "emoji 🙂🚀 and 1234567890 digits 3.14159",
          "   leading spaces and\ttabs\n\nnewlines   ", "The quick brown fox jumps over the lazy dog. " * 3,
          "def f(x):\n    return x ** 2  # square\n"]
# mixed scripts, accents, CJK, emoji (with ZWJ), whitespace runs, digits, specials inside text, unseen characters
TEXTS = CORPUS + ["  two leading spaces", "a  b   c    d     e", "tabs\t\tand\r\nCRLF", "x<think>y</think>z",
                  "ünïcödé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ©®™ ½", "👩‍👩‍👧 family", "Ελληνικά русский עברית العربية हिन्दी",
                  "\u00a0nbsp\u3000ideographic space", "0000 1111 2222 99999999", "trailing   ", ""]


def _pieces(size=420, prefix="first"):
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=True)
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def _write(path, arch, specials, pieces, scores, template=None, add_space_prefix=None, add_bos=True):
    """A GGUF holding only a tokenizer: transformers' AutoTokenizer and omnimini read nothing else."""
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [k for _, k in specials] + [6] * 256 + [1] * len(pieces)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * (len(specials) + 256) + scores)
    names = [t for t, _ in specials]
    w.add_bos_token_id(names.index("<s>" if "<s>" in names else "<bos>"))
    w.add_eos_token_id(names.index("</s>" if "</s>" in names else "<eos>"))
    w.add_unk_token_id(names.index("<unk>"))
    w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LLAMA_SPECIALS = [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<think>", 4), ("</think>", 4)]
# Gemma: whitespace-run pieces stored as real spaces, control turn markers, scores that do not follow the order
GEMMA_SPECIALS = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3),
                  ("<end_of_turn>", 3), ("<think>", 4), ("</think>", 4)]


def _llama_file(d, arch="llama", template=None):
    pieces = _pieces()
    return _write(d / f"{arch}.gguf", arch, LLAMA_SPECIALS, pieces, [-float(i) for i in range(len(pieces))],
                  template=template)


def _gemma_file(d):
    pieces = _pieces(prefix="never") + [" " * n for n in range(2, 6)]
    return _write(d / "gemma3.gguf", "gemma3", GEMMA_SPECIALS, pieces, [0.0] * len(pieces), add_space_prefix=False)


def _check_against_transformers(path):
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = tokenizer_from_gguf(metadata(open_gguf(path)))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids)
        # byte fallback: every character survives the round trip. Not quite in llama-style vocabularies, as in
        # transformers: decoding strips the added '▁', which a text starting with spaces did not get, and Phi-3
        # adds one after each added token
        if path.stem == "gemma3" or not (text[:1].isspace() or "<think>" in text):
            assert tok.decode(ids) == text
        if path.stem == "gemma3":  # what the server streams: each token's bytes
            assert b"".join(tok.token_bytes(i) for i in ids).decode() == text
    return tok, ref


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_llama_style_vocabulary_matches_transformers(tmp_path, arch):
    tok, ref = _check_against_transformers(_llama_file(tmp_path, arch))
    ids = tok.encode("x<think>y")
    assert tok.token_to_id("<think>") in ids
    snowman = [tok.token_to_id(f"<0x{b:02X}>") for b in "☃".encode()]  # a character no piece covers: its bytes
    assert tok.encode("☃")[-3:] == snowman
    # BOS: the file asks for it; transformers adds it, and so does a raw prompt here (chat templates say their own)
    assert tok.add_bos_token and tok.encode_prompt("hi") == ref("hi").input_ids
    assert tok.encode_prompt("hi")[0] == tok.bos_token_id == 1 and tok.eos_token_ids == [2]


def test_gemma_vocabulary_matches_transformers(tmp_path):
    tok, ref = _check_against_transformers(_gemma_file(tmp_path))
    assert tok.encode("a  b")[1] == tok.token_to_id("\u2581\u2581")  # a whitespace run is one piece
    assert tok.encode_prompt("hi") == ref("hi").input_ids and tok.encode_prompt("hi")[0] == 2
    # a base Gemma file has no chat template: Gemma's turn format, ending turns at <end_of_turn> too
    assert tok.eos_token_ids == [1, tok.token_to_id("<end_of_turn>")]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert tok.render_chat(chat) == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                                     "Hello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
                                     "<start_of_turn>model\n")
    assert tok.encode_chat(chat)[:2] == [2, tok.token_to_id("<start_of_turn>")]


def test_file_chat_template_and_no_space_prefix(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    pieces = _pieces()
    path = _write(tmp_path / "t.gguf", "llama", LLAMA_SPECIALS, pieces, [-float(i) for i in range(len(pieces))],
                  template=template, add_space_prefix=False, add_bos=False)
    tok = tokenizer_from_gguf(metadata(open_gguf(path)))
    assert tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "[user] hi\n"
    assert tok.encode_prompt("Hello") == tok.encode("Hello")  # add_bos_token false: no BOS
    # llama.cpp honours add_space_prefix = false (transformers ignores it): no '▁' before the first word
    assert tok.id_to_token(tok.encode("Hello")[0]) != "\u2581Hello"
    assert tok.decode(tok.encode(" Hello  world")) == " Hello  world"


def test_tokenizer_round_trips_through_a_checkpoint(tmp_path):
    from omnimini.tokenizer import Tokenizer

    tok = tokenizer_from_gguf(metadata(open_gguf(_gemma_file(tmp_path))))
    tok.save(tmp_path / "ck")
    again = Tokenizer.from_dir(tmp_path / "ck")
    assert again.add_bos_token and again.eos_token_ids == tok.eos_token_ids
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
