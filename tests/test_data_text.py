"""Text corpora: readers, bad input, packing with document boundaries, resumable streams, mixing."""

import json
import logging

import pytest

from omnimini.data.loader import Mixture, collate
from omnimini.data.packing import PackedText
from omnimini.data.text import DataError, Problems, expand_sources, iter_documents

EOS = 0


def enc(text: str) -> list[int]:
    # a character-level "tokenizer" keeps the tests independent of BPE merges: id = byte + 1 (0 is EOS)
    return [b + 1 for b in text.encode()]


def dec(ids) -> str:
    return bytes(i - 1 for i in ids if i > 0).decode()


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\nline two\n\nsecond doc\n\n\nthird\n")
    return p


def test_paragraph_line_and_file_splits(corpus):
    docs = [d for d, _ in iter_documents([str(corpus)])]
    assert docs == ["first doc\nline two", "second doc", "third"]
    assert [d for d, _ in iter_documents([str(corpus)], split="line")] == ["first doc", "line two", "second doc",
                                                                          "third"]
    assert len(list(iter_documents([str(corpus)], split="file"))) == 1


def test_resume_positions_restart_exactly(corpus, tmp_path):
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps({"text": "json one"}) + "\n" + json.dumps({"text": "json two"}) + "\n")
    files = [str(corpus), str(other)]
    full = list(iter_documents(files))
    for i, (_, pos) in enumerate(full):
        rest = [d for d, _ in iter_documents(files, start=pos)]
        assert rest == [d for d, _ in full[i + 1:]]


def test_packing_respects_document_boundaries(corpus):
    T = 7
    p = PackedText([str(corpus)], enc, EOS, T, repeat=False, reset_positions=True)
    seqs = list(p)
    stream = []
    for i, s in enumerate(seqs):
        assert len(s["input_ids"]) == T and len(s["labels"]) == T
        assert s["labels"][:-1] == s["input_ids"][1:]  # shifted by one
        if i:
            assert s["input_ids"][0] == seqs[i - 1]["labels"][-1]  # every token predicted exactly once
        stream += s["input_ids"]
        # positions restart right after each EOS
        for j in range(1, T):
            if s["input_ids"][j - 1] == EOS:
                assert s["positions"][j] == 0
            else:
                assert s["positions"][j] == s["positions"][j - 1] + 1
    docs = [dec(d) for d in _split(stream)]
    assert docs[:3] == ["first doc\nline two", "second doc", "third"][:len(docs[:3])]
    assert "first doc\nline two" in docs[0]


def _split(ids):
    cur, out = [], []
    for i in ids:
        if i == EOS:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    return out


def test_packed_stream_resumes_with_the_same_sequences(corpus):
    a = PackedText([str(corpus)], enc, EOS, 5)
    expected = [next(a) for _ in range(30)]  # several epochs
    b = PackedText([str(corpus)], enc, EOS, 5)
    got = [next(b) for _ in range(11)]
    state = json.loads(json.dumps(b.state_dict()))  # JSON-able
    c = PackedText([str(corpus)], enc, EOS, 5)
    c.load_state_dict(state)
    got += [next(c) for _ in range(19)]
    assert got == expected
    assert c.epoch >= 1


def test_malformed_json_lines_skipped_or_fatal(tmp_path, caplog):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "good one"}\n{"text": broken\n{"other": 1}\n{"text": "good two"}\n')
    probs = Problems()
    with caplog.at_level(logging.WARNING):
        docs = [d for d, _ in iter_documents([str(p)], problems=probs)]
    assert docs == ["good one", "good two"]
    assert probs.count == 2
    assert f"{p}:2: malformed JSON" in probs.examples[0]
    assert f"{p}:3: no string field 'text'" in probs.examples[1]
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON"):
        list(iter_documents([str(p)], problems=Problems(strict=True)))


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ok\n".encode("latin-1") + b"fine line\n")
    probs = Problems()
    docs = [d for d, _ in iter_documents([str(empty), str(bad)], problems=probs, split="line")]
    assert docs == ["fine line"]
    assert any("empty.txt: empty file" in m for m in probs.examples)
    assert any("latin1.txt:1: not UTF-8" in m for m in probs.examples)
    with pytest.raises(DataError, match="empty file"):
        list(iter_documents([str(empty)], problems=Problems(strict=True)))
    with pytest.raises(DataError, match="no usable documents"):
        next(PackedText([str(empty)], enc, EOS, 4))


def test_missing_source_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        expand_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        expand_sources([str(tmp_path / "d")])


def test_parquet_reader_and_resume(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)], "id": list(range(2500))}), p,
                   row_group_size=700)
    docs = list(iter_documents([str(p)]))
    assert [d for d, _ in docs[:2]] == ["row 0", "row 1"] and len(docs) == 2500
    rest = [d for d, _ in iter_documents([str(p)], start=docs[1499][1])]
    assert rest[0] == "row 1500" and len(rest) == 1000
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents([str(p)], text_key="body"))


class _Counter:
    def __init__(self, tag):
        self.tag, self.i = tag, 0

    def __next__(self):
        self.i += 1
        return {"input_ids": [self.i], "labels": [self.i], "tag": self.tag}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_mixture_weights_and_resume():
    m = Mixture({"a": (_Counter("a"), 3.0), "b": (_Counter("b"), 1.0)})
    tags = [next(m)["tag"] for _ in range(40)]
    assert tags.count("a") == 30 and tags.count("b") == 10
    state = m.state_dict()
    rest = [next(m)["input_ids"] for _ in range(8)]
    m2 = Mixture({"a": (_Counter("a"), 3.0), "b": (_Counter("b"), 1.0)})
    m2.load_state_dict(state)
    assert [next(m2)["input_ids"] for _ in range(8)] == rest
    with pytest.raises(DataError, match="weight"):
        Mixture({"a": (_Counter("a"), 0.0)})


def test_collate_pads_labels_with_ignore():
    b = collate([{"input_ids": [1, 2, 3], "labels": [2, 3, 4]}, {"input_ids": [5], "labels": [6]}], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [5, 9, 9]]
    assert b["labels"].tolist() == [[2, 3, 4], [6, -100, -100]]
    assert b["positions"] is None and b["pixels"] is None


def test_shared_text_folder_streams(shared_data):
    from omnimini.tokenizer import Tokenizer

    tok = Tokenizer.train([str(shared_data / "text" / "tinyshakespeare.txt")], 300, show_progress=False)
    eos = tok.token_to_id("<|endoftext|>")
    p = PackedText([str(shared_data / "text")], lambda s: tok.encode(s, allow_special=False), eos, 128)
    assert any(f.endswith("c4_demo.jsonl") for f in p.files) and any(f.endswith(".txt") for f in p.files)
    seqs = [next(p) for _ in range(20)]
    assert all(len(s["input_ids"]) == 128 for s in seqs) and p.problems.count == 0
    assert any(eos in s["input_ids"] for s in seqs)
