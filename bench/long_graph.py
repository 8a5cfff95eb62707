"""What ComfyUI does with a long graph, seen from its WebSocket: when each kind of message first
comes, how many come and how many bytes, and how long an interrupt takes to end the prompt.

    uv run python bench/long_graph.py                        # the real ComfyUI of `make comfyui-env`
    uv run python bench/long_graph.py --nodes 300 --interrupt-at 5
    uv run python bench/long_graph.py --url http://127.0.0.1:8188
    uv run python bench/long_graph.py --cached     # the interrupted run is the same graph again

The graph is tests/e2e/test_long_graphs.py's chain (LoadImage -> ImageInvert... -> SaveImage),
posted straight to ComfyUI (no worker), once to its end and once interrupted `--interrupt-at`
seconds after it was posted (a fresh input image, so nothing is served from the cache, unless
`--cached`: then every node of the second run is cached).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.e2e.test_long_graphs import chain_graph  # noqa: E402

ENDS = ("execution_success", "execution_interrupted", "execution_error")


def upload(url: str, color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    name = f"long-graph-{uuid.uuid4().hex[:8]}.png"
    requests.post(f"{url}/upload/image", files={"image": (name, buffer.getvalue())}, timeout=30).raise_for_status()
    return name


def trace(url: str, nodes: int, interrupt_at: float | None, image: str) -> dict[str, Any]:
    graph = chain_graph(nodes)
    graph["1"]["inputs"]["image"] = image
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}",
                                     skip_utf8_validation=True)
    ws.settimeout(0.1)
    t0 = time.monotonic()
    prompt_id = requests.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id},
                              timeout=120).json()["prompt_id"]
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    size = 0
    interrupted_at = None
    ended = None
    try:
        while True:
            now = time.monotonic() - t0
            if interrupt_at is not None and interrupted_at is None and now >= interrupt_at:
                requests.post(f"{url}/interrupt", json={"prompt_id": prompt_id}, timeout=30)
                interrupted_at = now
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(raw, bytes):
                continue
            size += len(raw)
            message = json.loads(raw)
            kind, data = message["type"], message.get("data") or {}
            counts[kind] = counts.get(kind, 0) + 1
            first.setdefault(kind, round(time.monotonic() - t0, 2))
            if kind in ENDS:
                ended = kind
            if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        ws.close()
    total = time.monotonic() - t0
    return {"nodes": nodes, "ended": ended, "seconds": round(total, 2), "first_s": first, "messages": counts,
            "message_mb": round(size / 1e6, 1), "interrupt_sent_at_s": interrupted_at,
            "ended_after_interrupt_s": round(total - interrupted_at, 2) if interrupted_at is not None else None}


@contextlib.contextmanager
def comfyui(url: str | None) -> Iterator[str]:
    if url:
        yield url.rstrip("/")
        return
    from tests.realcomfy import installed, start_real_comfyui

    with tempfile.TemporaryDirectory(prefix="diffbox-long-graph-") as tmp, \
            start_real_comfyui(installed(), Path(tmp), free_port()) as real:
        yield real.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=600)
    parser.add_argument("--interrupt-at", type=float, default=5.0, help="seconds after the post")
    parser.add_argument("--cached", action="store_true", help="interrupt the same graph again")
    parser.add_argument("--url", help="a running ComfyUI (default: start the real one of `make comfyui-env`)")
    args = parser.parse_args()
    with comfyui(args.url) as url:
        first = upload(url, (10, 20, 30))
        print(json.dumps(trace(url, args.nodes, None, first)), flush=True)
        second = first if args.cached else upload(url, (40, 50, 60))
        print(json.dumps(trace(url, args.nodes, args.interrupt_at, second)), flush=True)


if __name__ == "__main__":
    main()
