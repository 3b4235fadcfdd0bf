"""The state database: WAL, per-table-set migrations, several connections (servers) on one directory."""

from __future__ import annotations

import threading

import pytest

from omnimini.serve.store import Store, StoreError, default_state_dir


def test_migrate_applies_missing_steps_once(tmp_path):
    steps = ["CREATE TABLE t (a INTEGER)"]
    s = Store(tmp_path)
    assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    s.migrate("demo", steps)
    s.migrate("demo", steps)  # a second start: nothing to do
    with s.tx() as db:
        db.execute("INSERT INTO t VALUES (1)")
    s.close()
    s = Store(tmp_path)  # an upgraded server: one more step, earlier rows kept
    s.migrate("demo", [*steps, "ALTER TABLE t ADD COLUMN b TEXT DEFAULT 'x'; CREATE INDEX t_a ON t(a)"])
    assert [tuple(r) for r in s.query("SELECT a, b FROM t")] == [(1, "x")]
    assert s.query("SELECT version FROM schema_versions WHERE name = 'demo'")[0][0] == 2


def test_failed_transaction_rolls_back(tmp_path):
    s = Store(tmp_path)
    s.migrate("demo", ["CREATE TABLE t (a INTEGER PRIMARY KEY)"])
    with pytest.raises(StoreError):
        with s.tx() as db:
            db.execute("INSERT INTO t VALUES (1)")
            db.execute("INSERT INTO t VALUES (1)")  # constraint error: the whole transaction goes
    assert s.query("SELECT count(*) FROM t")[0][0] == 0


def test_two_connections_write_concurrently(tmp_path):
    a, b = Store(tmp_path), Store(tmp_path)
    a.migrate("demo", ["CREATE TABLE t (a INTEGER)"])
    b.migrate("demo", ["CREATE TABLE t (a INTEGER)"])  # the other server sees the set as migrated

    def write(store, base):
        for i in range(50):
            with store.tx() as db:
                db.execute("INSERT INTO t VALUES (?)", (base + i,))

    threads = [threading.Thread(target=write, args=(s, k * 100)) for k, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.query("SELECT count(*) FROM t")[0][0] == 100


def test_state_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIMINI_STATE_DIR", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("OMNIMINI_STATE_DIR")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert str(default_state_dir()).endswith(".local/share/omnimini")


def test_serve_with_unusable_state_dir_is_one_line(tmp_path, capsys):
    from omnimini.cli import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["serve", "--state-dir", str(tmp_path / "file"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnimini: error: --state-dir: cannot open the state database") and "Traceback" not in err
