"""Files and Batch APIs with the official openai client against a live 127.0.0.1 server: batches complete with
one output per custom_id, malformed lines fail alone, bad batches are refused in OpenAI's error shape, batches
resume after the server is killed without answering any line twice, and batch lines yield to interactive ones."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from test_server import LiveServer, free_port, tiny_tokenizer

from omnimini.config import ModelConfig
from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import Engine, EngineRequest, background_priority
from omnimini.model import OmniModel
from omnimini.serve.config import ServeConfig
from omnimini.serve.limits import ServeLimits

MAX_FILE = 64 * 1024


def tiny_model(tok) -> OmniModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=512)
    return OmniModel(cfg).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    cfg = ServeConfig(models=[("tiny", tiny_model(tok), tok)], aliases={"gpt-4o-mini": "tiny"}, port=free_port(),
                      max_batch=4, max_context=512, state_dir=str(tmp_path_factory.mktemp("state")),
                      limits=ServeLimits(max_file_bytes=MAX_FILE, max_tokens=256))
    srv = LiveServer(cfg)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_line(cid: str, content: str = "hello world", max_tokens: int = 4, model: str = "gpt-4o-mini",
              url: str = "/v1/chat/completions", **extra) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def upload(client, lines: list[str]):
    return client.files.create(file=("in.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="batch")


def wait_done(client, bid: str, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = client.batches.retrieve(bid)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {bid} did not finish: {b.status} {b.request_counts}")


def jsonl(client, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def test_twenty_line_batch_completes_with_every_custom_id(client, server):
    f = upload(client, [chat_line(f"req-{i}", f"question {i}") for i in range(20)])
    assert f.purpose == "batch" and f.bytes > 0 and client.files.retrieve(f.id).id == f.id
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "nightly"})
    assert b.status == "validating" and b.request_counts.total == 20 and b.metadata == {"job": "nightly"}
    b = wait_done(client, b.id)
    assert b.status == "completed" and b.completed_at and b.in_progress_at and b.finalizing_at
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (20, 20, 0)
    assert b.error_file_id is None
    out = jsonl(client, b.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20))
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert _metric(server.url, "omnimini_background_requests_total") >= 20  # batch lines ran at background priority


def test_responses_and_embeddings_batches(client):
    resp = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                        "body": {"model": "gpt-4o-mini", "input": f"hello {i}", "max_output_tokens": 4}})
            for i in range(3)]
    emb = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "gpt-4o-mini", "input": ["hello world", "paris"][i]}}) for i in range(2)]
    for endpoint, lines, kind in (("/v1/responses", resp, "response"), ("/v1/embeddings", emb, "list")):
        b = client.batches.create(input_file_id=upload(client, lines).id, endpoint=endpoint, completion_window="24h")
        b = wait_done(client, b.id)
        assert b.status == "completed" and b.request_counts.completed == len(lines), b.request_counts
        out = jsonl(client, b.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(json.loads(x)["custom_id"] for x in lines)
        assert all(o["response"]["body"]["object"] == kind for o in out)


def test_malformed_lines_fail_alone_in_the_error_file(client):
    lines = [chat_line("good-0"), "{not json", json.dumps({"method": "POST", "url": "/v1/chat/completions"}),
             chat_line("wrong-url", url="/v1/completions"), chat_line("good-1"),
             chat_line("bad-body", max_tokens=-5), chat_line("good-2")]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = wait_done(client, b.id)
    assert b.status == "completed"
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (7, 3, 4)
    assert sorted(o["custom_id"] for o in jsonl(client, b.output_file_id)) == ["good-0", "good-1", "good-2"]
    errs = jsonl(client, b.error_file_id)
    assert len(errs) == 4
    by_line = {e["error"]["message"].split(":")[0]: e for e in errs if e["error"]}
    assert set(by_line) == {"line 2", "line 3", "line 4"}  # the three lines that are not valid requests
    assert by_line["line 4"]["custom_id"] == "wrong-url"
    handler = [e for e in errs if e["response"]]  # a well-formed line the endpoint itself refused
    assert handler[0]["custom_id"] == "bad-body" and handler[0]["response"]["status_code"] == 400
    assert handler[0]["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_bad_batches_are_refused_and_the_server_keeps_serving(client, server):
    fid = upload(client, [chat_line("a")]).id
    cases = [dict(endpoint="/v1/unknown"), dict(endpoint="/v1/moderations"), dict(completion_window="1h"),
             dict(input_file_id="file-nope")]
    for case in cases:
        args = dict(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h") | case
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**args)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=upload(client, [chat_line("x", model="gpt-9")]).id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # duplicate custom_id
        client.batches.create(input_file_id=upload(client, [chat_line("d"), chat_line("d")]).id,
                              endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_file_over_the_size_limit_is_refused(client, server):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * (MAX_FILE + 10))), purpose="batch")
    assert e.value.status_code == 413 and e.value.body["message"]
    big = httpx.post(server.url + "/v1/files", files={"file": ("b.jsonl", b"y" * (MAX_FILE + 200_000))},
                     data={"purpose": "batch"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    assert httpx.get(server.url + "/health").status_code == 200


def test_cancel_and_list_with_pagination(client, tok):
    no_eos = {str(t): -100 for t in tok.eos_token_ids}
    lines = [chat_line(f"c{i}", max_tokens=200, logit_bias=no_eos) for i in range(12)]
    b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled") and c.cancelling_at
    c = wait_done(client, b.id)
    assert c.status == "cancelled" and c.cancelled_at and c.request_counts.completed < 12
    assert client.batches.cancel(b.id).status == "cancelled"  # cancelling again changes nothing
    done = client.batches.create(input_file_id=upload(client, [chat_line("z")]).id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
    wait_done(client, done.id)
    with pytest.raises(openai.APIStatusError) as e:  # a finished batch cannot be cancelled
        client.batches.cancel(done.id)
    assert e.value.status_code == 409
    page = client.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    ids = [x.id for x in client.batches.list(limit=2)]  # the client follows `after` page by page
    assert len(ids) == len(set(ids)) >= 4 and b.id in ids
    assert [x.id for x in client.batches.list(limit=100).data] == ids  # newest first, same order


def test_background_requests_leave_interactive_ones_unblocked(tok):
    eng = Engine(tiny_model(tok), tok, max_batch=4, prefix_cache_tokens=0)
    try:
        done: dict[str, float] = {}
        lock = threading.Lock()

        def sink_for(name):
            def sink(ev):
                if ev.finish_reason:
                    with lock:
                        done[name] = time.monotonic()
            return sink

        long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
        with background_priority():
            for i in range(6):  # more than the slots: they fill what background may use, the rest wait
                eng.submit(EngineRequest(tok.encode("the quick brown fox"), long), sink_for(f"bg{i}"))
        time.sleep(0.05)
        eng.submit(EngineRequest(tok.encode("hello"), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
                   sink_for("fg"))
        deadline = time.time() + 60
        while len(done) < 7 and time.time() < deadline:
            time.sleep(0.02)
        assert len(done) == 7
        assert done["fg"] < min(t for k, t in done.items() if k != "fg")  # it never waited for a batch slot
    finally:
        eng.shutdown()


# ---- restart: a server killed mid-batch resumes --------------------------------------------------------------

def _serve(model_dir, state, port) -> subprocess.Popen:
    code = "import sys; from omnimini.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMNIMINI_ENGINE_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(model_dir), "--quantize", "none",
                             "--port", str(port), "--state-dir", str(state), "--max-batch", "4",
                             "--batch-concurrency", "2", "--log-level", "warning"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url.rstrip("/") + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_server_killed_mid_batch_resumes_and_answers_each_line_once(tok, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir, tokenizer=tok)
    state, port = tmp_path / "state", free_port()
    no_eos = {str(t): -100 for t in tok.eos_token_ids}
    lines = [chat_line(f"k{i}", f"line {i}", max_tokens=120, logit_bias=no_eos)
             for i in range(16)]
    proc = _serve(model_dir, state, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        b = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        deadline = time.time() + 60
        while client.batches.retrieve(b.id).request_counts.completed < 3:
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with sqlite3.connect(state / "omnimini.db") as db:
            before = db.execute("SELECT COUNT(*) FROM batch_results WHERE batch_id = ?", (b.id,)).fetchone()[0]
        assert 3 <= before < 16
        proc = _serve(model_dir, state, port)
        b = wait_done(client, b.id)
        assert b.status == "completed" and b.request_counts.completed == 16
        out = jsonl(client, b.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"k{i}" for i in range(16))  # each exactly once
        # the restarted server ran only the lines that had no answer yet
        assert _metric(f"http://127.0.0.1:{port}", "omnimini_requests_total") == 16 - before
    finally:
        proc.kill()
        proc.wait(10)


def test_a_failed_file_write_leaves_no_record_and_no_partial_file(tmp_path, monkeypatch):
    from omnimini.serve.files import FileStore, FileWriteError
    from omnimini.serve.store import Store

    files = FileStore(Store(tmp_path))
    kept = files.put(b'{"a": 1}\n', "a.jsonl", "batch")

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(FileWriteError, match="No space left"):
        files.put(b"x" * 1000, "b.jsonl", "batch")
    assert [f.id for f in files.list()] == [kept.id] and files.read(kept.id) == b'{"a": 1}\n'
    assert sorted(p.name for p in files.dir.iterdir()) == [kept.id]  # the temporary file was removed
