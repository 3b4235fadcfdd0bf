"""The server's durable state: one SQLite database (stdlib sqlite3, WAL mode) under the state directory.

WAL lets several server processes share one directory: readers never block, a writer waits (busy_timeout)
for another's commit instead of failing. Each feature owns a *table set* with its own ordered list of schema
steps; `migrate` applies the steps a database has not seen yet, so upgrading a server never loses data.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STATE_DIR_ENV = "OMNIMINI_STATE_DIR"
DB_NAME = "omnimini.db"


class StoreError(RuntimeError):
    """The state database could not be read or written (full disk, read-only directory, corrupt file)."""


def default_state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "omnimini"


class Store:
    """One connection per Store, shared by the server's threads under a lock (sqlite3 calls are short)."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path = self.dir / DB_NAME
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process crash
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER)")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the state database in {self.dir}: {e}") from e
        self._lock = threading.RLock()

    def migrate(self, name: str, steps: list[str]) -> None:
        """Bring table set `name` up to len(steps): run each step it lacks, in order, each in a transaction."""
        with self.tx() as db:  # BEGIN IMMEDIATE: two processes starting at once do not both migrate
            row = db.execute("SELECT version FROM schema_versions WHERE name = ?", (name,)).fetchone()
            have = row[0] if row else 0
            for step in steps[have:]:
                _run_script(db, step)
            if len(steps) > have:
                db.execute("INSERT INTO schema_versions(name, version) VALUES(?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET version = excluded.version", (name, len(steps)))

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"the state database is not writable: {e}") from e
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"writing the state database failed: {e}") from e
                raise

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"reading the state database failed: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first; run the statements one by one inside it
    # (schema steps are plain DDL: no ';' inside string literals or triggers)
    for stmt in (s.strip() for s in script.split(";")):
        if stmt:
            db.execute(stmt)
