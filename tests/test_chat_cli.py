"""The terminal chat client, fed stdin lines, with a fake in-process stream_fn and a mocked OpenAI endpoint."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from omnimini.chat_cli import ChatInputError, ChatSession, chat_loop, image_data_url, openai_stream_fn, run_chat


class FakeStream:
    """Records the messages of each call and streams a reply whose pieces check that output is not buffered."""

    def __init__(self, out: io.StringIO | None = None, fail_on: str | None = None):
        self.calls: list[list[dict]] = []
        self.out = out
        self.fail_on = fail_on

    def __call__(self, messages):
        self.calls.append(json.loads(json.dumps(messages)))  # a snapshot: history is mutated later
        last = messages[-1]["content"]
        if self.fail_on and self.fail_on in json.dumps(last):
            raise RuntimeError("engine exploded")
        n_images = sum(p["type"] == "image_url" for p in last) if isinstance(last, list) else 0
        pieces = ["Hel", "lo ", f"({n_images} images)"]
        for i, p in enumerate(pieces):
            if self.out is not None and i:
                # Everything yielded so far is already on the terminal before the next piece.
                assert self.out.getvalue().endswith("".join(pieces[:i]))
            yield p


def _png(tmp_path, name="img.png", size=(5, 3)):
    path = tmp_path / name
    Image.new("RGB", size, (1, 2, 3)).save(path)
    return path


def _chat(lines: list[str], stream_fn, model="assistant", system=None):
    out = io.StringIO()
    if isinstance(stream_fn, FakeStream):
        stream_fn.out = out
    session = ChatSession(stream_fn, system=system)
    chat_loop(session, io.StringIO("\n".join(lines) + "\n"), out, label=model)
    return session.history, out.getvalue()


def test_run_chat_entry_point():
    fake = FakeStream()
    out = io.StringIO()
    fake.out = out
    assert run_chat(stream_fn=fake, system="S", stdin=io.StringIO("hey\n/quit\n"), stdout=out) == 0
    assert "assistant> Hello (0 images)" in out.getvalue()
    assert fake.calls == [[{"role": "system", "content": "S"}, {"role": "user", "content": "hey"}]]
    with pytest.raises(ChatInputError, match="exactly one"):
        run_chat()
    with pytest.raises(ChatInputError, match="base URL or a stream_fn"):
        run_chat(42)


def test_streams_reply_and_keeps_history():
    fake = FakeStream()
    history, out = _chat(["hi there", "", "second"], fake, model="m", system="Be kind.")
    assert "m> Hello (0 images)\n" in out
    assert out.count("Hello (0 images)") == 2
    assert fake.calls[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi there"}]
    assert [m["role"] for m in fake.calls[1]] == ["system", "user", "assistant", "user"]
    assert fake.calls[1][2]["content"] == "Hello (0 images)"
    assert history[-1] == {"role": "assistant", "content": "Hello (0 images)"}


def test_image_attached_as_data_url_part(tmp_path):
    fake = FakeStream()
    path = _png(tmp_path, "my pic.png")
    _, out = _chat([f"/image {path}", "what is it?", "and now?"], fake)
    assert "image attached" in out and "Hello (1 images)" in out
    content = fake.calls[0][-1]["content"]
    assert content[0] == {"type": "text", "text": "what is it?"}
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (5, 3)
    # The image goes with one message only.
    assert fake.calls[1][-1] == {"role": "user", "content": "and now?"}


def test_reset_quit_and_errors(tmp_path):
    fake = FakeStream()
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    history, out = _chat(
        ["one", "/reset", "two", "/image /nonexistent/x.png", f"/image {bad}", "/bogus", "/quit", "never sent"], fake
    )
    assert "conversation cleared" in out
    assert fake.calls[1] == [{"role": "user", "content": "two"}]  # /reset forgot "one"
    assert "error: no such image file: /nonexistent/x.png" in out
    assert "is not an image" in out
    assert "unknown command '/bogus'" in out
    assert len(fake.calls) == 2 and "never sent" not in json.dumps(history)


def test_failed_request_is_taken_back_and_chat_goes_on(tmp_path):
    fake = FakeStream(fail_on="boom")
    path = _png(tmp_path)
    history, out = _chat([f"/image {path}", "boom", "fine"], fake)
    assert "error: RuntimeError: engine exploded" in out
    # The failed turn left no trace in the history; its image went with the next message instead.
    assert [m["role"] for m in fake.calls[1]] == ["user"]
    assert fake.calls[1][0]["content"][1]["type"] == "image_url"
    assert history[-1]["content"] == "Hello (1 images)"


def test_image_data_url_checks_the_file(tmp_path):
    assert image_data_url(_png(tmp_path)).startswith("data:image/png;base64,")
    jpg = tmp_path / "x.jpg"
    Image.new("RGB", (2, 2)).save(jpg)
    assert image_data_url(jpg).startswith("data:image/jpeg;base64,")
    bmp = tmp_path / "x.bmp"
    Image.new("RGB", (2, 2)).save(bmp)
    with pytest.raises(ChatInputError, match="BMP"):
        image_data_url(bmp)
    with pytest.raises(ValueError, match="no such image"):
        image_data_url(tmp_path / "missing.png")


def test_openai_endpoint_stream(tmp_path):
    """The base-URL path, with the openai client over a mocked transport that speaks SSE."""
    import openai

    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "tiny", "object": "model", "created": 0, "owned_by": "me"}]})
        seen.append(json.loads(request.content))
        chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                   "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in ("Hi", "!")]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(base_url="http://test/v1", api_key="k", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)))
    stream_fn, model = openai_stream_fn("http://test/v1", client=client, temperature=0.5)
    assert model == "tiny"
    history, out = _chat([f"/image {_png(tmp_path)}", "hello"], stream_fn, model=model)
    assert "tiny> Hi!\n" in out
    assert seen[0]["model"] == "tiny" and seen[0]["stream"] is True and seen[0]["temperature"] == 0.5
    assert seen[0]["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert history[-1] == {"role": "assistant", "content": "Hi!"}
