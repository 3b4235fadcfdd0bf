"""`omnimini chat`: a terminal chat loop with streamed replies.

It talks either to an OpenAI-compatible endpoint (a base URL, through the `openai` client) or to any
in-process callable `stream_fn(messages) -> Iterator[str]`, so the CLI can drive the engine directly
without starting a server. Messages use OpenAI's chat shape; images go as `image_url` parts with
`data:` URLs, exactly as the server and the web page send them.
"""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

StreamFn = Callable[[list[dict]], Iterator[str]]

IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
HELP = (
    "commands: /image PATH  attach an image to your next message\n"
    "          /reset       forget the conversation\n"
    "          /help        show this\n"
    "          /quit        leave (also Ctrl-D); Ctrl-C stops a reply"
)


class ChatInputError(ValueError):
    """A chat command or attachment the client cannot use (the message says why)."""


def image_data_url(path: str | Path) -> str:
    """Read an image file and return it as a `data:` URL, checking it really is a supported image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ChatInputError(f"no such image file: {p}")
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except UnidentifiedImageError as e:
        raise ChatInputError(f"{p} is not an image Pillow can read") from e
    if fmt not in IMAGE_MIME:
        raise ChatInputError(f"{p} is {fmt}; supported images are {', '.join(IMAGE_MIME)}")
    return f"data:{IMAGE_MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(text: str, images: list[str]) -> dict:
    """An OpenAI user message: plain string content, or text + image_url parts when images are attached."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": parts}


def openai_stream_fn(base_url: str, model: str | None = None, api_key: str | None = None, client: Any = None,
                     **params: Any) -> tuple[StreamFn, str]:
    """A stream_fn backed by an OpenAI-compatible server; returns it with the model name it uses.

    `params` are passed to `chat.completions.create` (temperature, top_p, max_tokens, seed, ...).
    Without `model`, the server's first listed model is used.
    """
    import openai

    # The openai client insists on a key; servers without auth ignore it.
    client = client or openai.OpenAI(base_url=base_url, api_key=api_key or "none")
    if model is None:
        models = [m.id for m in client.models.list()]
        if not models:
            raise ChatInputError(f"the server at {base_url} lists no models")
        model = models[0]

    def stream(messages: list[dict]) -> Iterator[str]:
        chunks = client.chat.completions.create(model=model, messages=messages, stream=True, **params)
        try:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            chunks.close()  # frees the server's slot at once when the reply is interrupted

    return stream, model


@dataclass
class ChatSession:
    """Conversation state, kept apart from terminal I/O so it is easy to test and reuse."""

    stream_fn: StreamFn
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history.clear()
        self.pending_images.clear()

    def attach(self, path: str) -> None:
        self.pending_images.append(image_data_url(path.strip().strip("'\"")))

    def send(self, text: str, out: TextIO) -> str:
        """Add the user turn, stream the reply to `out` piece by piece, and keep it in the history.

        On an error the user turn is taken back (images stay attached) and the error is re-raised.
        Ctrl-C stops the reply early; the part received so far is kept.
        """
        images, self.pending_images = self.pending_images, []
        self.history.append(user_message(text, images))
        reply: list[str] = []
        stream = None
        try:
            stream = self.stream_fn(self.messages())
            for piece in stream:
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except BaseException:
            self.history.pop()
            self.pending_images = images + self.pending_images
            raise
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
            out.write("\n")
            out.flush()
        text_out = "".join(reply)
        self.history.append({"role": "assistant", "content": text_out})
        return text_out


def _lines(stdin: TextIO, out: TextIO, prompt: str) -> Iterator[str]:
    """Input lines; the interactive terminal gets a prompt (and readline editing via input())."""
    interactive = stdin is sys.stdin and stdin.isatty()
    while True:
        try:
            line = input(prompt) if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; returns False when the chat should end."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif cmd == "/image":
        if not arg.strip():
            raise ChatInputError("usage: /image PATH")
        session.attach(arg)
        n = len(session.pending_images)
        out.write(f"(image attached to your next message; {n} pending)\n")
    elif cmd == "/help":
        out.write(HELP + "\n")
    else:
        raise ChatInputError(f"unknown command {cmd!r}\n{HELP}")
    return True


def chat_loop(session: ChatSession, stdin: TextIO, out: TextIO, label: str = "assistant") -> None:
    """Read lines until /quit or end of input: /commands act on the session, other lines are sent."""
    out.write(f"chatting with {label} - /help for commands\n")
    for line in _lines(stdin, out, "you> "):
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/"):
                if not _command(session, text, out):
                    break
                continue
            out.write(f"{label}> ")
            session.send(text, out)
        except ChatInputError as e:
            out.write(f"error: {e}\n")
        except Exception as e:  # a failed request must not end the chat
            out.write(f"error: {type(e).__name__}: {e}\n")
        out.flush()


def run_chat(target: str | StreamFn | None = None, model: str | None = None, system: str | None = None, *,
             base_url: str | None = None, stream_fn: StreamFn | None = None, api_key: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None, **params: Any) -> int:
    """Chat in the terminal until /quit or end of input; returns 0 (an exit status).

    Talk to either an OpenAI-compatible server (`base_url`, e.g. "http://127.0.0.1:8000/v1", with `api_key`
    and sampling `params` such as temperature) or an in-process `stream_fn(messages) -> Iterator[str]`.
    `target` is a positional shorthand for either one. Without `model`, a server's first listed model is used.
    """
    if target is not None:
        if isinstance(target, str):
            base_url = base_url or target
        elif callable(target):
            stream_fn = stream_fn or target
        else:
            raise ChatInputError(f"run_chat needs a base URL or a stream_fn callable, got {type(target).__name__}")
    if (base_url is None) == (stream_fn is None):
        raise ChatInputError("run_chat needs exactly one of base_url (an OpenAI-compatible server) or stream_fn")
    if base_url is not None:
        stream_fn, model = openai_stream_fn(base_url, model, api_key=api_key, **params)
    session = ChatSession(stream_fn, system=system)
    chat_loop(session, stdin or sys.stdin, stdout or sys.stdout, label=model or "assistant")
    return 0
