"""The web chat page in a real headless Chromium, against a small fake OpenAI-compatible server.

The fake server lets the page be tested on its own: it streams a reply token by token that says
whether an image came with the request, followed by a markdown sample, and records every request.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

CHROMIUM = Path("/usr/bin/chromium")
STATIC = Path(__file__).resolve().parents[1] / "src" / "omnimini" / "serve" / "static"
MARKDOWN_SAMPLE = (
    "Here is **bold**, *italic* and `inline code`.\n\n"
    "```python\nprint('<b>hi</b>')\n```\n\n"
    "- first item\n- second item\n\n"
    "See [the docs](https://example.com/docs)."
)
# Playwright runs function expressions without eval(), which the page's CSP forbids.
MODELS_LOADED = "() => document.querySelectorAll('#model option').length === 2"
LONG_WORDS = 400  # the "long" reply takes ~20 s, so only a working stop button ends it in time

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="web chat browser test needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install -y chromium)"
)


@dataclass
class FakeLog:
    """What the fake server saw, shared with the test thread."""

    requests: list[dict] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)  # per chat request: "running", "done" or "cancelled"


def _reply_for(body: dict) -> str:
    last = body["messages"][-1]
    content = last["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
    images = [p for p in parts if p.get("type") == "image_url"]
    if "long" in text:
        return " ".join(f"w{i}" for i in range(LONG_WORDS))
    urls = ",".join(p["image_url"]["url"].split(";")[0] for p in images)
    head = f"Echo: {text}. Image attached: {'yes ' + urls if images else 'no'}. Turns: {len(body['messages'])}."
    return head + "\n\n" + MARKDOWN_SAMPLE


def _tokens(text: str) -> list[str]:
    # Small pieces (about 3 characters) so markdown arrives half-finished, as it does from a model.
    return [text[i : i + 3] for i in range(0, len(text), 3)]


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    obj = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake-mini",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = usage
    return "data: " + json.dumps(obj) + "\n\n"


def make_fake_app(log: FakeLog):
    app = FastAPI()

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    def models(request: Request):
        log.auth.append(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"}
                                           for m in ("fake-mini", "fake-large")]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        log.requests.append(body)
        log.auth.append(request.headers.get("authorization"))
        if "please fail" in json.dumps(body["messages"][-1]):
            err = {"message": "Fake failure: this model refuses", "type": "invalid_request_error",
                   "param": "messages", "code": None}
            return JSONResponse({"error": err}, status_code=400)
        index = len(log.streams)
        log.streams.append("running")
        pieces = _tokens(_reply_for(body))
        delay = 0.05 if len(pieces) > 200 else 0.02

        async def stream():
            try:
                yield _chunk({"role": "assistant", "content": ""})
                for p in pieces:
                    await asyncio.sleep(delay)
                    yield _chunk({"content": p})
                yield _chunk({}, finish="stop")
                yield _chunk({}, usage={"prompt_tokens": 5, "completion_tokens": len(pieces),
                                        "total_tokens": 5 + len(pieces)})
                yield "data: [DONE]\n\n"
                log.streams[index] = "done"
            finally:
                if log.streams[index] == "running":
                    log.streams[index] = "cancelled"  # the client went away mid-stream

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class ServerThread:
    """uvicorn in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, app, lifespan: str = "off"):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def fake():
    log = FakeLog()
    with ServerThread(make_fake_app(log)) as srv:
        yield srv.url, log


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (python)")
    sync_playwright = sync_api.sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, fake):
    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = ctx.new_page()
    pg.set_default_timeout(10000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(fake[0])
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _png(tmp_path: Path, name="dot.png", color=(200, 30, 30)) -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", (24, 16), color).save(path)
    return path


def _last_assistant(page):
    return page.locator(".msg.assistant .bubble").last


def _wait_done(page, timeout=15000):
    page.wait_for_selector("#send:not([hidden])", timeout=timeout)
    page.wait_for_function("() => !document.querySelector('.msg.assistant .bubble.streaming')", timeout=timeout)


def test_models_listed_and_streamed_markdown_reply(page, fake):
    _, log = fake
    page.wait_for_function(MODELS_LOADED)
    assert page.locator("#model option").all_inner_texts() == ["fake-mini", "fake-large"]
    page.select_option("#model", "fake-large")

    n = len(log.requests)
    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    # Mid-stream: some text is shown, the reply is still open, and the stop button is offered.
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('.msg.assistant .bubble')].pop();"
        " return b && b.classList.contains('streaming') && b.textContent.length > 3; }"
    )
    partial = _last_assistant(page).text_content()
    assert page.locator("#stop").is_visible()
    _wait_done(page)
    final = _last_assistant(page).text_content()
    assert len(partial) < len(final)
    assert final.startswith(partial[:3])
    assert "Echo: hello there. Image attached: no." in final

    body = log.requests[n]
    assert body["model"] == "fake-large" and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "hello there"}]

    bubble = _last_assistant(page)
    assert bubble.locator("strong").first.text_content() == "bold"
    assert bubble.locator("em").first.text_content() == "italic"
    assert bubble.locator("p code").first.text_content() == "inline code"
    # The HTML inside the code block is shown as text, not parsed.
    assert bubble.locator("pre code.language-python").text_content() == "print('<b>hi</b>')"
    assert bubble.locator("pre b").count() == 0
    assert bubble.locator("ul > li").all_text_contents() == ["first item", "second item"]
    assert bubble.locator("a").get_attribute("href") == "https://example.com/docs"
    assert page.locator(".msg.user .bubble").last.text_content() == "hello there"
    assert "tokens" in page.locator(".msg.assistant .meta").last.text_content()
    assert page.input_value("#input") == ""

    # Second turn carries the history; "New chat" clears it.
    page.fill("#input", "again")
    page.click("#send")
    _wait_done(page)
    msgs = log.requests[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == _reply_for({"messages": [{"role": "user", "content": "hello there"}]})
    assert "Turns: 3." in _last_assistant(page).text_content()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "fresh")
    page.press("#input", "Enter")
    _wait_done(page)
    assert len(log.requests[-1]["messages"]) == 1


def test_image_attach_preview_and_request(page, fake, tmp_path):
    _, log = fake
    page.wait_for_function(MODELS_LOADED)
    page.set_input_files("#file-input", str(_png(tmp_path)))
    thumb = page.locator("#attachments .thumb img")
    thumb.wait_for()
    assert thumb.get_attribute("src").startswith("data:image/png;base64,")
    assert thumb.evaluate("img => img.complete && img.naturalWidth") == 24

    # Removing works, then attach again by drag-and-drop.
    page.click("#attachments .thumb button")
    assert page.locator("#attachments .thumb").count() == 0
    png_bytes = list(_png(tmp_path, "drop.png", (10, 120, 10)).read_bytes())
    page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'drop.png', {type: 'image/png'}));
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        png_bytes,
    )
    thumb.wait_for()
    assert page.locator("#attachments .thumb").count() == 1

    page.fill("#input", "what is this")
    page.press("#input", "Enter")
    _wait_done(page)
    assert "Image attached: yes data:image/png" in _last_assistant(page).text_content()
    content = log.requests[-1]["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "what is this"}
    url = content[1]["image_url"]["url"]
    assert content[1]["type"] == "image_url" and url.startswith("data:image/png;base64,")
    import base64

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (24, 16) and img.convert("RGB").getpixel((0, 0)) == (10, 120, 10)
    # The sent image is shown in the conversation and the composer is empty again.
    assert page.locator(".msg.user img").count() == 1
    assert page.locator("#attachments .thumb").count() == 0
    page.screenshot(path="/tmp/webchat_desktop.png")


def test_stop_aborts_long_stream(page, fake):
    _, log = fake
    page.wait_for_function(MODELS_LOADED)
    page.fill("#input", "a long one please")
    page.press("#input", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .bubble') || {}).textContent?.includes('w3')")
    index = len(log.streams) - 1
    t0 = time.monotonic()
    page.click("#stop")
    _wait_done(page, timeout=5000)
    assert time.monotonic() - t0 < 5
    text = _last_assistant(page).text_content()
    assert "w3" in text and f"w{LONG_WORDS - 1}" not in text
    assert "stopped" in page.locator(".msg.assistant .meta").last.text_content()
    # The server saw the client go away rather than finishing the stream.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.streams[index] == "running":
        time.sleep(0.05)
    assert log.streams[index] == "cancelled"
    # The partial reply stays in the history for the next turn.
    page.fill("#input", "next")
    page.press("#input", "Enter")
    _wait_done(page)
    msgs = log.requests[-1]["messages"]
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"].startswith("w0 w1 w2 w3")


def test_settings_api_key_and_errors(page, fake, tmp_path):
    url, log = fake
    page.wait_for_function(MODELS_LOADED)
    page.click("#settings-toggle")
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0.3")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "64")
    page.fill("#seed", "7")
    page.fill("#api-key", "sk-test-123")
    page.locator("#api-key").dispatch_event("change")
    page.wait_for_function(MODELS_LOADED)
    page.click("#settings-close")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    _wait_done(page)
    body = log.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.3, 0.9, 64, 7)
    assert log.auth[-1] == "Bearer sk-test-123"

    # Settings survive a reload (localStorage).
    page.reload()
    page.wait_for_function(MODELS_LOADED)
    assert page.input_value("#api-key") == "sk-test-123"
    assert page.input_value("#temperature") == "0.3"
    assert log.auth[-1] == "Bearer sk-test-123"

    # A bad setting is reported before anything is sent.
    n = len(log.requests)
    page.click("#settings-toggle")
    page.fill("#temperature", "5")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    assert "Temperature must be a number between 0 and 2" in page.locator("#error").text_content()
    assert len(log.requests) == n
    page.fill("#temperature", "")

    # A server error shows the OpenAI error message and gives the turn (text and image) back.
    page.set_input_files("#file-input", str(_png(tmp_path)))
    page.locator("#attachments .thumb").wait_for()
    page.fill("#input", "please fail")
    page.press("#input", "Enter")
    page.locator("#error").wait_for()
    page.wait_for_function("() => document.querySelector('#error-text').textContent.includes('Fake failure')")
    assert "400" in page.text_content("#error-text")
    assert page.input_value("#input") == "please fail"
    assert page.locator("#attachments .thumb").count() == 1
    assert page.locator(".msg.user").count() == 0
    page.click("#error-close")
    assert not page.locator("#error").is_visible()


def test_markdown_renderer_is_safe(page):
    md = lambda s: page.evaluate("s => window.omniMarkdown(s)", s)  # noqa: E731
    assert md("<img src=x onerror=alert(1)>") == "<p>&lt;img src=x onerror=alert(1)&gt;</p>"
    assert "<a" not in md("[click](javascript:alert(1))")
    assert "<a" not in md("[x](data:text/html,hi)")
    assert '"' not in md('[x](https://a.com/"onmouseover="alert(1))').split("href=")[1].split('"')[1]
    assert md("**a** and __b__ and *c* and _d_ and ~~e~~") == (
        "<p><strong>a</strong> and <strong>b</strong> and <em>c</em> and <em>d</em> and <del>e</del></p>"
    )
    assert md("snake_case_name and 2*3*4") == "<p>snake_case_name and 2*3*4</p>"
    assert md("`<script>` x") == "<p><code>&lt;script&gt;</code> x</p>"
    assert md("# Title\ntext") == "<h1>Title</h1>\n<p>text</p>"
    assert md("1. a\n2. b\n   - nested\n3. c").count("<li>") == 4
    assert "<ol><li>a</li><li>b<ul><li>nested</li></ul></li><li>c</li></ol>" == md("1. a\n2. b\n   - nested\n3. c")
    assert md("3. x\n4. y").startswith('<ol start="3">')
    # An unclosed fence (mid-stream) renders as code so far.
    assert "<pre><code>half = 1 &lt; 2</code></pre>" in md("```\nhalf = 1 < 2")
    table = md("| a | b |\n|---|--:|\n| 1 | <i>2</i> |")
    assert "<th>a</th>" in table and '<td style="text-align:right">&lt;i&gt;2&lt;/i&gt;</td>' in table
    assert md("> quoted *x*") == "<blockquote><p>quoted <em>x</em></p></blockquote>"
    assert 'href="https://x.org/a?b=1&amp;c=2"' in md("see https://x.org/a?b=1&c=2.")
    # Raw NUL bytes cannot forge the renderer's internal placeholders.
    assert md("\u00000\u0000 `c`") == "<p>0 <code>c</code></p>"


def test_phone_width_layout(browser, fake, tmp_path):
    ctx = browser.new_context(viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True,
                              has_touch=True)
    pg = ctx.new_page()
    pg.goto(fake[0])
    pg.wait_for_function(MODELS_LOADED)
    pg.fill("#input", "hello from a phone")
    pg.click("#send")
    _wait_done(pg)
    # Nothing is wider than the screen, and the composer stays on screen.
    assert pg.evaluate("document.documentElement.scrollWidth") <= 375
    box = pg.locator("#send").bounding_box()
    assert box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 740
    pg.screenshot(path="/tmp/webchat_phone.png")
    pg.click("#settings-toggle")
    sbox = pg.locator("#settings").bounding_box()
    assert sbox["width"] <= 375 and sbox["x"] >= 0
    pg.screenshot(path="/tmp/webchat_phone_settings.png")
    ctx.close()


def _real_server_stack(tmp: Path):
    """The project's own server (omnimini.serve) with a tiny random vision model and an API key."""
    import random

    import torch

    from omnimini.config import ModelConfig, VisionConfig
    from omnimini.model import OmniModel
    from omnimini.serve.app import build_app
    from omnimini.serve.config import ServeConfig
    from omnimini.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog hello world red green image".split()
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)))
    tok = Tokenizer.train([str(corpus)], 300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=512,
                      vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, pixel_shuffle=2),
                      image_token_id=tok.image_token_id)
    model = OmniModel(cfg).eval()
    return build_app(ServeConfig(models=[("tiny-vision", model, tok)], aliases={}, api_keys=["sk-real"],
                                 max_batch=2, max_context=512))


def test_against_real_server(browser, tmp_path):
    try:
        app = _real_server_stack(tmp_path)
    except ImportError as e:
        pytest.skip(f"omnimini.serve is not available yet: {e}")
    with ServerThread(app, lifespan="on") as srv:
        ctx = browser.new_context(viewport={"width": 1000, "height": 760})
        pg = ctx.new_page()
        pg.set_default_timeout(20000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(srv.url)
        # Without the key the server answers 401 and the page says so; with it, the models load.
        pg.wait_for_function("() => document.querySelector('#error-text').textContent.includes('401')")
        assert "API key" in pg.text_content("#error-text")
        pg.click("#settings-toggle")
        pg.fill("#api-key", "sk-real")
        pg.locator("#api-key").dispatch_event("change")
        pg.fill("#max-tokens", "6")
        pg.fill("#seed", "1")
        pg.click("#settings-close")
        pg.wait_for_function("() => document.querySelector('#model option[value=\"tiny-vision\"]')")
        pg.select_option("#model", "tiny-vision")
        assert not pg.locator("#error").is_visible()

        pg.set_input_files("#file-input", str(_png(tmp_path)))
        pg.locator("#attachments .thumb").wait_for()
        pg.fill("#input", "what colour is this image")
        pg.press("#input", "Enter")
        _wait_done(pg, timeout=60000)
        assert not pg.locator("#error").is_visible(), pg.text_content("#error-text")
        # The random model's six tokens arrived and were counted by the server's usage chunk.
        assert pg.locator(".msg.assistant .bubble").count() == 1
        assert "6 tokens" in pg.locator(".msg.assistant .meta").text_content()
        assert "cut off at max tokens" in pg.locator(".msg.assistant .meta").text_content()
        assert pg.locator(".msg.user img").count() == 1
        ctx.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
