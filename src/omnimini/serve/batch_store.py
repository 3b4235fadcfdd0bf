"""Batches (`/v1/batches`) in the Store's "batches" table set: one row per batch, one row per answered line.

A line's result is committed the moment it is answered (primary key batch + line, inserted once), so a server
that dies mid-batch resumes with only the unanswered lines; the output and error files are written from these
rows when the batch finalises.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from omnimini.serve.store import Store

SCHEMA = [
    """CREATE TABLE batches (
         id TEXT PRIMARY KEY,
         created_at INTEGER NOT NULL,
         endpoint TEXT NOT NULL,
         input_file_id TEXT NOT NULL,
         completion_window TEXT NOT NULL,
         status TEXT NOT NULL,
         total INTEGER NOT NULL,
         metadata TEXT,                -- JSON object or NULL
         output_file_id TEXT,
         error_file_id TEXT,
         errors TEXT,                  -- JSON list of {code, message, param, line} or NULL
         times TEXT NOT NULL,          -- JSON {in_progress_at, finalizing_at, completed_at, ...}
         owner TEXT,                   -- host:pid of the server running it
         heartbeat REAL
       );
       CREATE INDEX batches_created ON batches(created_at, id);
       CREATE TABLE batch_results (
         batch_id TEXT NOT NULL,
         line INTEGER NOT NULL,        -- 0-based line of the input file
         ok INTEGER NOT NULL,          -- 1: output file, 0: error file
         record TEXT NOT NULL,         -- the JSON line as written to the output / error file
         PRIMARY KEY (batch_id, line)
       )""",
]

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TIME_FIELDS = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "cancelling_at", "cancelled_at")
STALE_S = 60.0  # another host's claim is taken over when its heartbeat is older than this


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return heartbeat is not None and time.time() - heartbeat < STALE_S


class BatchStore:
    def __init__(self, store: Store):
        self.store = store
        store.migrate("batches", SCHEMA)

    # ---- rows --------------------------------------------------------------------------------------------

    def create(self, endpoint: str, input_file_id: str, window: str, total: int, metadata: dict | None) -> str:
        bid = new_batch_id()
        now = int(time.time())
        times = {k: None for k in TIME_FIELDS} | {"expires_at": now + 24 * 3600}
        with self.store.tx() as db:
            db.execute("INSERT INTO batches (id, created_at, endpoint, input_file_id, completion_window, status, "
                       "total, metadata, times) VALUES (?, ?, ?, ?, ?, 'validating', ?, ?, ?)",
                       (bid, now, endpoint, input_file_id, window, total,
                        json.dumps(metadata) if metadata is not None else None, json.dumps(times)))
        return bid

    def row(self, bid: str):
        rows = self.store.query("SELECT * FROM batches WHERE id = ?", (bid,))
        return rows[0] if rows else None

    def page(self, after: str | None, limit: int) -> tuple[list, bool]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        if after:
            cur = self.row(after)
            if cur is None:
                return [], False
            rows = self.store.query("SELECT * FROM batches WHERE (created_at, id) < (?, ?) "
                                    "ORDER BY created_at DESC, id DESC LIMIT ?", (cur["created_at"], after, limit + 1))
        else:
            rows = self.store.query("SELECT * FROM batches ORDER BY created_at DESC, id DESC LIMIT ?", (limit + 1,))
        return rows[:limit], len(rows) > limit

    def set_status(self, bid: str, status: str, stamp: str | None = None, only_from: tuple = (), **cols) -> bool:
        """Move a batch to `status` (and stamp `<stamp>` with now); with `only_from`, only from those states."""
        with self.store.tx() as db:
            row = db.execute("SELECT status, times FROM batches WHERE id = ?", (bid,)).fetchone()
            if row is None or (only_from and row["status"] not in only_from):
                return False
            times = json.loads(row["times"])
            if stamp:
                times[stamp] = int(time.time())
            sets = ", ".join(f"{k} = ?" for k in cols)
            db.execute(f"UPDATE batches SET status = ?, times = ?{', ' + sets if sets else ''} WHERE id = ?",
                       (status, json.dumps(times), *cols.values(), bid))
        return True

    def active_ids(self) -> list[str]:
        rows = self.store.query(f"SELECT id FROM batches WHERE status IN ({','.join('?' * len(ACTIVE))}) "
                                "ORDER BY created_at, id", ACTIVE)
        return [r["id"] for r in rows]

    def claim(self, bid: str) -> bool:
        """Take batch `bid` for this process unless a live server already runs it (several may share a store)."""
        me = this_owner()
        with self.store.tx() as db:
            row = db.execute("SELECT owner, heartbeat FROM batches WHERE id = ?", (bid,)).fetchone()
            if row is None or (row["owner"] != me and _owner_alive(row["owner"], row["heartbeat"])):
                return False
            db.execute("UPDATE batches SET owner = ?, heartbeat = ? WHERE id = ?", (me, time.time(), bid))
        return True

    def heartbeat(self, bid: str) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE batches SET heartbeat = ? WHERE id = ? AND owner = ?", (time.time(), bid, this_owner()))

    # ---- results -----------------------------------------------------------------------------------------

    def add_result(self, bid: str, line: int, ok: bool, record: dict) -> None:
        with self.store.tx() as db:
            db.execute("INSERT OR IGNORE INTO batch_results VALUES (?, ?, ?, ?)",
                       (bid, line, int(ok), json.dumps(record, ensure_ascii=False)))

    def done_lines(self, bid: str) -> set[int]:
        return {r["line"] for r in self.store.query("SELECT line FROM batch_results WHERE batch_id = ?", (bid,))}

    def counts(self, bid: str) -> tuple[int, int]:
        rows = self.store.query("SELECT ok, COUNT(*) AS n FROM batch_results WHERE batch_id = ? GROUP BY ok", (bid,))
        by = {r["ok"]: r["n"] for r in rows}
        return by.get(1, 0), by.get(0, 0)

    def results(self, bid: str, ok: bool) -> list[str]:
        rows = self.store.query("SELECT record FROM batch_results WHERE batch_id = ? AND ok = ? ORDER BY line",
                                (bid, int(ok)))
        return [r["record"] for r in rows]

    # ---- the OpenAI object -------------------------------------------------------------------------------

    def to_openai(self, row) -> dict:
        completed, failed = self.counts(row["id"])
        errors = json.loads(row["errors"]) if row["errors"] else None
        return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
                "errors": {"object": "list", "data": errors} if errors else None,
                "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
                "status": row["status"], "output_file_id": row["output_file_id"],
                "error_file_id": row["error_file_id"], "created_at": row["created_at"],
                **json.loads(row["times"]),
                "request_counts": {"total": row["total"], "completed": completed, "failed": failed},
                "metadata": json.loads(row["metadata"]) if row["metadata"] else None}
