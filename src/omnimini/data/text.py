"""Streaming text corpora: plain text, JSON lines, parquet (and Hugging Face `datasets` when online).

Every document comes with a *position* (file index, byte offset or row) from which reading can restart, so a
training run can save exactly where its data stream stands and resume there without re-reading the corpus.
Bad input (empty files, non-UTF-8 bytes, malformed JSON lines) is reported with file and line; `strict=True`
makes it fatal, otherwise the offending item is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
MAX_DOC_CHARS = 1 << 20  # a paragraph longer than this is cut, so one huge line cannot blow up memory


class DataError(ValueError):
    """Unusable training data: a missing/empty/undecodable file, a malformed record, an unknown format."""


@dataclass
class Problems:
    """Collects bad-input reports: raises at once when strict, otherwise logs the first few and counts them."""

    strict: bool = False
    max_logged: int = 20
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, msg: str) -> None:
        if self.strict:
            raise DataError(msg)
        self.count += 1
        if len(self.examples) < self.max_logged:
            self.examples.append(msg)
            log.warning("skipped: %s", msg)


MALFORMED = object()  # what parse_json_line returns for a bad line (a valid line may hold `null`)


def parse_json_line(line: str, where: str, problems: Problems):
    """One JSON-lines record, or MALFORMED after reporting the line as `where: malformed JSON (...)`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        problems.report(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
        return MALFORMED


def data_root() -> Path | None:
    """The shared data folder from OMNIMINI_DATA (None when unset)."""
    env = os.environ.get("OMNIMINI_DATA")
    return Path(env) if env else None


def resolve_path(p: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """A path as given, or relative to --data / OMNIMINI_DATA when it does not exist as given."""
    path = Path(p)
    if path.exists() or path.is_absolute():
        return path
    for root in (data_dir, data_root()):
        if root is not None and (Path(root) / path).exists():
            return Path(root) / path
    return path


def expand_sources(sources: list[str], data_dir=None) -> list[str]:
    """Files (directories expanded, sorted) and `hf:` dataset names, in a stable order."""
    out: list[str] = []
    for s in sources:
        if str(s).startswith("hf:"):
            out.append(str(s))
            continue
        p = resolve_path(s, data_dir)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in
                           TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not files:
                raise DataError(f"{p}: directory holds no .txt/.jsonl/.parquet files")
            out += [str(f) for f in files]
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"data source not found: {s} (looked as given, under --data and OMNIMINI_DATA)")
    if not out:
        raise DataError("no data sources given")
    return out


# ---- readers: each yields (text, resume offset after this document) ---------------------------------------


def _decode(raw: bytes, path: str, lineno: int, problems: Problems) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.report(f"{path}:{lineno}: not UTF-8 text (bad byte at column {e.start + 1})")
        return None


def read_plain(path: str, offset: int, split: str, problems: Problems) -> Iterator[tuple[str, int]]:
    """Documents of a plain-text file. split: "paragraph" (blank-line separated), "line" or "file"."""
    if split not in ("paragraph", "line", "file"):
        raise DataError(f"text split must be paragraph|line|file, got {split!r}")
    if offset == 0 and os.path.getsize(path) == 0:
        problems.report(f"{path}: empty file")
        return
    buf: list[str] = []
    size = 0
    with open(path, "rb") as f:
        f.seek(offset)
        for lineno, raw in enumerate(iter(f.readline, b""), start=1):
            line = _decode(raw, path, lineno, problems)
            if line is None:
                continue
            if split == "line":
                if line.strip():
                    yield line.rstrip("\n"), f.tell()
                continue
            if split == "paragraph" and not line.strip():
                doc, buf, size = "".join(buf).strip("\n"), [], 0
                if doc.strip():
                    yield doc, f.tell()
                continue
            buf.append(line)
            size += len(line)
            if size > MAX_DOC_CHARS:  # "file" mode on a big file: cut into ~1M-character documents
                doc, buf, size = "".join(buf).strip("\n"), [], 0
                yield doc, f.tell()
        doc = "".join(buf).strip("\n")
        if doc.strip():
            yield doc, f.tell()


def read_jsonl(path: str, offset: int, text_key: str, problems: Problems) -> Iterator[tuple[str, int]]:
    if offset == 0 and os.path.getsize(path) == 0:
        problems.report(f"{path}: empty file")
        return
    with open(path, "rb") as f:
        f.seek(offset)
        lineno = 0  # counted from the resume offset; exact line numbers when reading from the start
        for raw in iter(f.readline, b""):
            lineno += 1
            if not raw.strip():
                continue
            line = _decode(raw, path, lineno, problems)
            if line is None:
                continue
            rec = parse_json_line(line, f"{path}:{lineno}", problems)
            if rec is MALFORMED:
                continue
            text = rec.get(text_key) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                problems.report(f"{path}:{lineno}: no string field {text_key!r}")
                continue
            if text:
                yield text, f.tell()


def read_parquet(path: str, row: int, text_key: str, problems: Problems) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        problems.report(f"{path}: not a readable parquet file ({e})")
        return
    if text_key not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {pf.schema_arrow.names})")
    i = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        col = batch.column(0).to_pylist()
        if i + len(col) <= row:
            i += len(col)
            continue
        for text in col:
            i += 1
            if i <= row:
                continue
            if isinstance(text, str) and text:
                yield text, i


def read_hf(name: str, row: int, text_key: str) -> Iterator[tuple[str, int]]:
    """`hf:NAME[:CONFIG][:SPLIT]` through `datasets` in streaming mode (optional dependency, needs network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: the `datasets` package is not installed (pip install datasets)") from None
    parts = name[3:].split(":")
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 2 else None,
                               split=parts[-1] if len(parts) > 1 else "train", streaming=True)
    for i, rec in enumerate(ds.skip(row) if row else ds, start=row + 1):
        text = rec.get(text_key)
        if isinstance(text, str) and text:
            yield text, i


def iter_documents(sources: list[str], *, text_key: str = "text", split: str = "paragraph",
                   problems: Problems | None = None, start: tuple[int, int] = (0, 0)
                   ) -> Iterator[tuple[str, tuple[int, int]]]:
    """(document, resume position) over expanded sources; `start` is a position previously yielded."""
    problems = problems or Problems()
    first_file, first_off = start
    for fi in range(first_file, len(sources)):
        src = sources[fi]
        off = first_off if fi == first_file else 0
        if src.startswith("hf:"):
            docs = read_hf(src, off, text_key)
        elif src.endswith(PARQUET_SUFFIXES):
            docs = read_parquet(src, off, text_key, problems)
        elif src.endswith(JSONL_SUFFIXES):
            docs = read_jsonl(src, off, text_key, problems)
        else:
            docs = read_plain(src, off, split, problems)
        for text, pos in docs:
            yield text, (fi, pos)
