"""Uploaded and generated files (`/v1/files`): metadata in the Store's "files" table set, bytes on disk.

Each file's bytes live in `<state dir>/files/<id>`, written to a temporary name, fsynced and renamed, so a crash
or a full disk never leaves a half-written file under a real id; the row is inserted only after the rename.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from omnimini.serve.store import Store, StoreError

SCHEMA = [
    """CREATE TABLE files (
         id TEXT PRIMARY KEY,
         bytes INTEGER NOT NULL,
         created_at INTEGER NOT NULL,
         filename TEXT NOT NULL,
         purpose TEXT NOT NULL
       )""",
]

UPLOAD_PURPOSES = ("batch",)  # what clients may upload here; batch_output is written by the server


class FileWriteError(StoreError):
    """A file could not be written (full disk, read-only state directory)."""


@dataclass
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


class FileStore:
    def __init__(self, store: Store):
        self.store = store
        self.dir = store.dir / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        store.migrate("files", SCHEMA)

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def put(self, data: bytes, filename: str, purpose: str, file_id: str | None = None) -> FileRecord:
        """Write `data` durably, then record it (an existing id is replaced: finalising a batch is redoable)."""
        rec = FileRecord(file_id or new_file_id(), len(data), int(time.time()), filename, purpose)
        write_atomic(self.path(rec.id), data)
        with self.store.tx() as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                       (rec.id, rec.bytes, rec.created_at, rec.filename, rec.purpose))
        return rec

    def get(self, file_id: str) -> FileRecord | None:
        rows = self.store.query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(**dict(rows[0])) if rows else None

    def list(self, purpose: str | None = None, limit: int = 10_000) -> list[FileRecord]:
        sql, args = "SELECT * FROM files", ()
        if purpose:
            sql, args = sql + " WHERE purpose = ?", (purpose,)
        rows = self.store.query(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        return [FileRecord(**dict(r)) for r in rows]

    def read(self, file_id: str) -> bytes:
        try:
            return self.path(file_id).read_bytes()
        except OSError as e:
            raise StoreError(f"the content of {file_id} cannot be read: {e}") from e

    def delete(self, file_id: str) -> bool:
        with self.store.tx() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if gone:
            self.path(file_id).unlink(missing_ok=True)
        return gone


def write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename: readers see the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileWriteError(f"writing {path.name} failed: {e}") from e
