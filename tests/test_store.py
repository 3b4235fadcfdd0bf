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


def _serve(model_dir, state_dir, port):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "omnimini.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--state-dir", str(state_dir), "--quantize", "none", "--max-batch", "1",
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(proc, url):
    import time

    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not start")


def test_two_server_processes_share_state_and_survive_a_kill(tiny_ckpt, tmp_path):
    """A response made by one `omnimini serve` process is continued by another after the first is killed -9."""
    import openai
    from test_server import free_port

    ports = free_port(), free_port()
    procs = [_serve(tiny_ckpt / "model", tmp_path, p) for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for proc, url in zip(procs, urls, strict=True):
            _wait_ready(proc, url)
        a, b = (openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=60) for u in urls)
        first = a.responses.create(model="gpt-4o-mini", input="quick fox", max_output_tokens=3)
        procs[0].kill()  # no shutdown, no flush: the commit alone must have made it durable
        procs[0].wait(30)
        second = b.responses.create(model="gpt-4o-mini", input="lazy dog", previous_response_id=first.id,
                                    max_output_tokens=3)
        assert b.responses.retrieve(first.id).output_text == first.output_text
        items = b.responses.input_items.list(second.id, order="asc").data
        assert [i.id for i in items][:2] == [*(i.id for i in b.responses.input_items.list(first.id).data),
                                             first.output[0].id]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
