"""Tokenise a document stream and pack it into fixed-length training sequences.

Documents are concatenated with an EOS token after each one (so the model learns where a document ends and
never sees two documents glued without a separator); a sequence of T inputs takes T + 1 tokens and the next
sequence starts at the last of them, so every token is predicted exactly once. With `reset_positions` each
document's tokens get positions counted from its own start (RoPE then sees every document as a fresh text).

The stream is a resumable iterator: `state_dict()` (file, offset, leftover tokens, epoch) is small and JSON-able,
and `load_state_dict()` continues with exactly the sequence that would have come next.
"""

from __future__ import annotations

from collections.abc import Callable

from omnimini.data.text import DataError, Problems, expand_sources, iter_documents


class PackedText:
    def __init__(self, sources: list[str], encode: Callable[[str], list[int]], eos_id: int, seq_len: int, *,
                 text_key: str = "text", split: str = "paragraph", strict: bool = False,
                 reset_positions: bool = False, repeat: bool = True, data_dir=None):
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.files = expand_sources(sources, data_dir)
        self.encode, self.eos_id, self.seq_len = encode, eos_id, seq_len
        self.text_key, self.split, self.reset_positions, self.repeat = text_key, split, reset_positions, repeat
        self.problems = Problems(strict=strict)
        self.epoch, self.pos = 0, (0, 0)
        self.buf: list[int] = []
        self.buf_pos: list[int] = []  # document-relative position of each buffered token
        self.docs_read = 0
        self._docs = None

    # ---- iteration -----------------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def _next_doc(self) -> list[int] | None:
        if self._docs is None:
            self._docs = iter_documents(self.files, text_key=self.text_key, split=self.split,
                                        problems=self.problems, start=self.pos)
        for text, pos in self._docs:
            self.pos = pos
            ids = self.encode(text)
            if ids:
                return ids
        return None

    def _fill(self) -> bool:
        ids = self._next_doc()
        if ids is None:
            if not self.repeat:
                return False
            if self.docs_read == 0 and self.epoch == 0:
                raise DataError(f"no usable documents in {self.files}")
            self.epoch, self.pos, self._docs = self.epoch + 1, (0, 0), None
            ids = self._next_doc()
            if ids is None:
                raise DataError(f"no usable documents in {self.files}")
        self.docs_read += 1
        self.buf += ids + [self.eos_id]
        self.buf_pos += range(len(ids) + 1)
        return True

    def __next__(self) -> dict:
        T = self.seq_len
        while len(self.buf) < T + 1:
            if not self._fill():
                raise StopIteration  # the final partial sequence is dropped (never padded)
        window, pos = self.buf[:T + 1], self.buf_pos[:T]
        self.buf, self.buf_pos = self.buf[T:], self.buf_pos[T:]
        sample = {"input_ids": window[:-1], "labels": window[1:]}
        if self.reset_positions:
            sample["positions"] = pos
        return sample

    # ---- resume --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": list(self.pos), "buf": list(self.buf), "buf_pos": list(self.buf_pos),
                "docs_read": self.docs_read, "files": len(self.files)}

    def load_state_dict(self, state: dict) -> None:
        if state["files"] != len(self.files):
            raise DataError(f"resume state was saved with {state['files']} data files, now there are "
                            f"{len(self.files)}: the data position cannot be restored")
        self.epoch, self.pos = state["epoch"], tuple(state["pos"])
        self.buf, self.buf_pos = list(state["buf"]), list(state["buf_pos"])
        self.docs_read, self._docs = state["docs_read"], None
