"""One image request end to end through `omnimini serve` (the default model, omnimini-vl), timed from the client.

    .venv/bin/python bench/vision_request.py [--requests 5] [--tokens 32]

Starts the server on a free 127.0.0.1 port, sends a 256x256 PNG (a held-out plain-shapes image) plus a question
through the official `openai` client, `max_tokens` tokens greedy (ignoring EOS is not an API option, so the
question asks for a description long enough to use them), and prints the median / max wall time per request and
the answer. Target (issue 16): < 2 s on 2 cores. Stops the server when done.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--startup-timeout", type=float, default=600)
    a = ap.parse_args()
    import httpx
    from openai import OpenAI

    from omnimini.data.scenes.shapes import ShapesFamily

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "omnimini.cli", "serve", "--port", str(port)],
                              env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < a.startup_timeout:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                print("server exited during start-up", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"server healthy after {time.time() - t0:.1f} s")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        ep = ShapesFamily(image_size=256).episode(10_000_000, "colour")
        buf = io.BytesIO()
        ep.image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe the image in detail."}]}]
        times, usage, text = [], None, ""
        for _ in range(a.requests):
            t = time.perf_counter()
            r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=a.tokens,
                                               temperature=0)
            times.append(time.perf_counter() - t)
            usage, text = r.usage, r.choices[0].message.content
        print(f"{a.requests} requests, 256x256 image, {usage.completion_tokens} output tokens "
              f"({usage.prompt_tokens} prompt): median {statistics.median(times):.2f} s, max {max(times):.2f} s")
        print(f"answer: {text!r}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
