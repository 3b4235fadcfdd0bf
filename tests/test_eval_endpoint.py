"""Eval clients against a fake OpenAI-compatible endpoint on 127.0.0.1: retries, failures,
caching, resumption; and the in-process client's batching."""

import asyncio
import json
import re
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from test_eval_tasks import write_gpqa, write_mmlu

from omnimini.eval.cache import ResponseCache, cache_key
from omnimini.eval.clients import InProcessClient, OpenAIEndpointClient, image_to_data_url, to_openai_messages
from omnimini.eval.runner import RunConfig, format_summary, run, run_async
from omnimini.eval.tasks import get_tasks

# question text -> (behaviour, correct letter); the fake server reads the behaviour tag
BEHAVIOUR_ROWS = [
    ["q-ok-1 [ok]", "a", "b", "c", "d", "B"],
    ["q-ok-2 [ok]", "a", "b", "c", "d", "D"],
    ["q-wrong [wrong]", "a", "b", "c", "d", "A"],
    ["q-429 [429]", "a", "b", "c", "d", "C"],
    ["q-500x2 [500x2]", "a", "b", "c", "d", "A"],
    ["q-garbage-once [garbage-once]", "a", "b", "c", "d", "B"],
    ["q-500 [500]", "a", "b", "c", "d", "C"],
    ["q-garbage [garbage]", "a", "b", "c", "d", "D"],
    ["q-slow [slow]", "a", "b", "c", "d", "A"],
]
ANSWERS = {r[0]: r[5] for r in BEHAVIOUR_ROWS}


class FakeState:
    def __init__(self):
        self.total = 0
        self.attempts: dict[str, int] = {}
        self.stall_after: int | None = None
        self.answers = dict(ANSWERS)
        self.models_seen: set[str] = set()


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    def reply(text):
        return JSONResponse({"id": "x", "object": "chat.completion", "model": "fake",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.total += 1
        state.models_seen.add(body["model"])
        n = state.total
        prompt = body["messages"][-1]["content"]
        prompt = prompt if isinstance(prompt, str) else " ".join(p.get("text", "") for p in prompt)
        while state.stall_after is not None and n > state.stall_after:
            await asyncio.sleep(0.02)  # a hung server; released when the test clears stall_after
        if "right" in prompt:  # GPQA fixture: the option text starting with "right" is correct
            return reply("Answer: " + re.search(r"^([A-D])\) right", prompt, re.M).group(1))
        question = next(q for q in state.answers if q in prompt)
        tag = re.search(r"\[([\w-]+)\]", question).group(1)
        attempt = state.attempts[question] = state.attempts.get(question, 0) + 1
        letter = state.answers[question]
        if tag == "429" and attempt == 1:
            return PlainTextResponse("slow down", status_code=429, headers={"Retry-After": "0.05"})
        if tag == "500" or (tag == "500x2" and attempt <= 2):
            return PlainTextResponse("boom", status_code=500)
        if tag == "garbage" or (tag == "garbage-once" and attempt == 1):
            return PlainTextResponse("<html>not json{", status_code=200)
        if tag == "slow":
            await asyncio.sleep(1.0)
        if tag == "wrong":
            letter = "ABCD"[("ABCD".index(letter) + 1) % 4]
        return reply(f"The answer is ({letter}).")

    return app


@pytest.fixture
def fake_endpoint():
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="error", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "fake endpoint did not start"
    yield f"http://127.0.0.1:{port}/v1", state
    state.stall_after = None
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def client_for(url, **kw):
    opts = {"model": "fake-model", "concurrency": 4, "timeout": 0.3, "max_retries": 2, "backoff_base": 0.01}
    return OpenAIEndpointClient(url, **{**opts, **kw})


def mmlu_cfg(tmp_path, rows, **kw):
    data = write_mmlu(tmp_path / "data", rows={"misc": rows}, dev={})
    return RunConfig(tasks=["mmlu"], out_dir=tmp_path / "out", data_dir=data, **kw)


def test_retries_and_failures_do_not_lose_other_items(tmp_path, fake_endpoint):
    url, state = fake_endpoint
    results = run(client_for(url), mmlu_cfg(tmp_path, BEHAVIOUR_ROWS))
    tr = results["tasks"]["mmlu"]
    by_q = {r["id"]: r for r in tr["items"]}
    ok = [by_q[f"misc/{i}"] for i in (0, 1, 3, 4, 5)]  # ok, ok, 429-then-ok, 500x2-then-ok, garbage-once
    assert all(r["correct"] and r.get("error") is None for r in ok)
    assert by_q["misc/2"]["correct"] is False and by_q["misc/2"].get("error") is None
    for i in (6, 7, 8):  # always 500, always garbage, always too slow
        assert by_q[f"misc/{i}"]["error"].startswith("failed after 3 attempts"), by_q[f"misc/{i}"]
        assert by_q[f"misc/{i}"]["correct"] is False
    assert "HTTP 500" in by_q["misc/6"]["error"] and "unparsable" in by_q["misc/7"]["error"]
    assert "Timeout" in by_q["misc/8"]["error"]
    assert state.attempts["q-500 [500]"] == 3 and state.attempts["q-429 [429]"] == 2
    assert tr["n_items"] == 9 and tr["n_failed"] == 3
    assert tr["metrics"]["overall"]["mean"] == pytest.approx(5 / 9)
    assert tr["usage"]["completion_tokens"] == 3 * 6
    assert state.models_seen == {"fake-model"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tasks"]["mmlu"]["n_failed"] == 3 and saved["model"].endswith("fake-model")
    assert "mmlu" in format_summary(saved) and "55.6" in format_summary(saved)
    # failed items are not cached: 6 successes stored
    assert len(ResponseCache(tmp_path / "out" / "cache.jsonl")) == 6


def test_retry_after_header_is_honoured(tmp_path, fake_endpoint):
    url, state = fake_endpoint
    client = client_for(url, backoff_base=30.0)  # own backoff would take ~15-30 s
    start = time.perf_counter()
    results = run(client, mmlu_cfg(tmp_path, [BEHAVIOUR_ROWS[3]]))
    assert time.perf_counter() - start < 5
    assert results["tasks"]["mmlu"]["items"][0]["correct"]


def test_second_run_is_served_from_cache(tmp_path, fake_endpoint):
    url, state = fake_endpoint
    rows = BEHAVIOUR_ROWS[:4]
    first = run(client_for(url), mmlu_cfg(tmp_path, rows))
    sent = state.total
    second = run(client_for(url), mmlu_cfg(tmp_path, rows))
    assert state.total == sent  # zero requests
    assert second["tasks"]["mmlu"]["requests"] == 0 and second["cache"]["hits"] == 4
    strip = lambda r: [(i["id"], i["pred"], i["correct"]) for i in r["tasks"]["mmlu"]["items"]]
    assert strip(first) == strip(second)
    # another model or other params are different cache entries
    run(client_for(url, model="other"), mmlu_cfg(tmp_path, rows))
    assert state.total == sent + 4


def test_interrupted_run_resumes_where_it_stopped(tmp_path, fake_endpoint):
    url, state = fake_endpoint
    rows = [[f"q{i} [ok]", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(10)]
    state.answers.update({r[0]: r[5] for r in rows})
    state.stall_after = 4  # the 5th request hangs: we "kill" the run there
    cfg = mmlu_cfg(tmp_path, rows, concurrency=1)

    async def killed_run():
        client = client_for(url, timeout=30)
        job = asyncio.ensure_future(run_async(client, cfg))
        for _ in range(500):
            if state.total >= 5:
                break
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await client.aclose()

    asyncio.run(killed_run())
    assert len(ResponseCache(tmp_path / "out" / "cache.jsonl")) == 4
    state.stall_after = None
    before = state.total
    results = run(client_for(url), cfg)
    assert state.total - before == 6  # only the items that had not finished
    tr = results["tasks"]["mmlu"]
    assert tr["n_items"] == 10 and tr["metrics"]["overall"]["mean"] == 1.0


def test_torn_cache_line_is_ignored(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = ResponseCache(path)
    cache.put("k1", {"text": "A"})
    with path.open("a") as f:
        f.write('{"key": "k2", "val')  # killed mid-write
    again = ResponseCache(path)
    assert len(again) == 1 and again.get("k1") == {"text": "A"} and again.get("k2") is None


def test_gpqa_results_and_cache_hold_no_question_text(tmp_path, fake_endpoint):
    url, state = fake_endpoint
    data = tmp_path / "data"
    write_gpqa(data, "diamond", n=4)
    results = run(client_for(url), RunConfig(tasks=["gpqa_diamond"], out_dir=tmp_path / "out", data_dir=data))
    tr = results["tasks"]["gpqa_diamond"]
    assert tr["metrics"]["overall"]["mean"] == 1.0 and tr["items"][0]["id"] == "rec000"
    for name in ("results.json", "cache.jsonl"):
        text = (tmp_path / "out" / name).read_text()
        assert "Secret" not in text and "right0" not in text and "wrong0" not in text, name
    assert set(tr["items"][0]) >= {"id", "target", "pred", "correct"} and "response" not in tr["items"][0]


def test_images_become_data_urls_and_hash_into_cache_keys():
    from PIL import Image

    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    url = image_to_data_url(red)
    assert url.startswith("data:image/png;base64,")
    msgs = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "hi"}]}]
    assert to_openai_messages(msgs)[0]["content"][0] == {"type": "image_url", "image_url": {"url": url}}
    other = [{"role": "user", "content": [{"type": "image", "image": blue}, {"type": "text", "text": "hi"}]}]
    assert cache_key("m", "chat", msgs, {}) == cache_key("m", "chat", list(msgs), {})
    assert cache_key("m", "chat", msgs, {}) != cache_key("m", "chat", other, {})
    assert cache_key("m", "chat", msgs, {}) != cache_key("m", "chat", msgs, {"temperature": 0.5})


def test_in_process_client_batches_generation_and_loglik(tmp_path):
    data = write_mmlu(tmp_path / "data", rows={"misc": BEHAVIOUR_ROWS}, dev={})
    calls = []

    def generate_fn(batch, params):
        calls.append(len(batch))
        return [f"Answer: {next(a for q, a in ANSWERS.items() if q in m[-1]['content'])}" for m in batch]

    def loglik_fn(requests):
        out = []
        for context, conts in requests:
            letter = next(a for q, a in ANSWERS.items() if q in context)
            out.append([0.0 if c.strip() == letter else -5.0 for c in conts])
        return out

    gen = InProcessClient(generate_fn, model_id="fake-local", max_batch=4)
    res = run(gen, RunConfig(tasks=["mmlu"], data_dir=data, mode="generate", concurrency=9))
    assert res["tasks"]["mmlu"]["metrics"]["overall"]["mean"] == 1.0
    assert max(calls) == 4 and sum(calls) == 9  # batched, never above max_batch

    ll = InProcessClient(generate_fn, loglik_fn=loglik_fn, model_id="fake-local", max_batch=16)
    res = run(ll, RunConfig(tasks=["mmlu"], data_dir=data, concurrency=9))  # auto -> log-likelihood
    items = res["tasks"]["mmlu"]["items"]
    assert all(i["mode"] == "loglik" and i["correct"] for i in items)
    assert max(ll.batch_sizes) > 1


def test_in_process_generate_error_is_recorded_per_item(tmp_path):
    data = write_mmlu(tmp_path / "data", rows={"misc": BEHAVIOUR_ROWS[:3]}, dev={})

    def broken(batch, params):
        raise RuntimeError("engine exploded")

    res = run(InProcessClient(broken), RunConfig(tasks=["mmlu"], data_dir=data))
    tr = res["tasks"]["mmlu"]
    assert tr["n_failed"] == 3 and "engine exploded" in tr["items"][0]["error"]


def test_scene_qa_runs_with_subscores():
    pytest.importorskip("omnimini.data.scenes")
    task = get_tasks("scene_qa")[0]
    client = InProcessClient(lambda batch, params: ["A"] * len(batch), model_id="always-a")
    res = run(client, RunConfig(tasks=["scene_qa"], limit=12), [task])
    tr = res["tasks"]["scene_qa"]
    assert tr["n_items"] == 12 and tr["n_failed"] == 0
    m = tr["metrics"]
    assert set(m["by_format"]) <= {"mc", "short"} and m["groups"] and m["by_qtype"]
    mc = [i for i in tr["items"] if i["format"] == "mc"]
    assert all(i["correct"] == (i["target"] == "A") for i in mc)


def test_loglik_mode_needs_a_loglik_client(tmp_path):
    from omnimini.eval.errors import EvalError

    data = write_mmlu(tmp_path / "data")
    with pytest.raises(EvalError, match="--mode loglik needs"):
        run(InProcessClient(lambda b, p: ["A"] * len(b)), RunConfig(tasks=["mmlu"], data_dir=data, mode="loglik"))
