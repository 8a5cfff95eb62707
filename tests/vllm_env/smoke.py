"""Start real vLLM on the tiny model, check the OpenAI API behaviours diffbox
relies on, print the measured figures, and stop the server cleanly.

Usage (any python >= 3.9, standard library only):
    python3 tests/vllm_env/smoke.py [--cache-dir DIR] [--port P]

DIR defaults like setup.sh (${DIFFBOX_TEST_CACHE:-~/.cache/diffbox-test});
run `bash tests/vllm_env/setup.sh` first. Exit code 0 only if every check passed.
Not a pytest module on purpose: it needs minutes and ~1.5 GB, so it is run by
hand (or by a dedicated job) rather than collected with the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_cmd(python: Path, model: Path, port: int) -> list[str]:
    # `python -m ...api_server` rather than the `vllm` console script, which
    # fails in this venv; --enforce-eager skips torch.compile (minutes on CPU).
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--dtype", "bfloat16", "--max-model-len", "256",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # Without it the engine's internal message queue binds the machine's
    # external address instead of loopback.
    env["VLLM_HOST_IP"] = "127.0.0.1"
    # GiB reserved for the KV cache; the default (a share of RAM) is far more
    # than a 256-token tiny model needs.
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


def children(pid: int) -> list[int]:
    """All descendants of pid (vLLM forks an engine core and a worker)."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in by_parent.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def memory_mib(pids: list[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) of pids. RSS double-counts pages the engine
    processes share (torch libraries, shared-memory queues); PSS splits them,
    so it is the better estimate of what the tree really costs."""
    rss_kib = pss_kib = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss_kib += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss_kib += int(line.split()[1])
        except OSError:
            pass
    return rss_kib // 1024, pss_kib // 1024


def request(url: str, body: JSON | None = None, timeout: float = 60) -> tuple[int, JSON]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sse(url: str, body: JSON, timeout: float = 60) -> Iterator[JSON]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                return
            yield json.loads(payload)


def main() -> int:
    ap = argparse.ArgumentParser()
    default_cache = os.environ.get("DIFFBOX_TEST_CACHE") or str(Path.home() / ".cache/diffbox-test")
    ap.add_argument("--cache-dir", default=default_cache)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=240)
    args = ap.parse_args()

    cache = Path(args.cache_dir)
    python, model = cache / "vllm-venv/bin/python", cache / "tiny-llama"
    if not python.exists() or not (model / "config.json").exists():
        print(f"missing {python} or {model}: run bash tests/vllm_env/setup.sh", file=sys.stderr)
        return 2
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = cache / "vllm-smoke.log"  # overwritten each run
    figures: JSON = {"port": port, "log": str(log_path)}
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        try:
            results.append((name, True, fn()))
        except Exception as e:  # report every check, not just the first failure
            results.append((name, False, f"{type(e).__name__}: {e}"))

    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_cmd(python, model, port), env=server_env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # /health turns 200 before the engine can really serve (a broken model
        # only dies on its first request), so readiness = a real completion.
        ready_body = {"model": str(model), "prompt": "Hi", "max_tokens": 1}
        while True:
            if proc.poll() is not None:
                print(f"vLLM exited with {proc.returncode}; see {log_path}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > args.ready_timeout:
                print(f"vLLM not ready after {args.ready_timeout}s; see {log_path}", file=sys.stderr)
                return 1
            try:
                if request(f"{base}/v1/completions", ready_body, timeout=10)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        figures["ready_s"] = round(time.monotonic() - t0, 1)
        tree = [proc.pid, *children(proc.pid)]
        figures["processes"] = len(tree)

        chat = f"{base}/v1/chat/completions"
        msgs = [{"role": "user", "content": "Describe the picture."}]
        base_req: JSON = {"model": str(model), "messages": msgs, "temperature": 0, "seed": 7,
                          "max_tokens": 24}
        state: JSON = {}

        def non_streamed() -> str:
            code, r = request(chat, base_req)
            assert code == 200, (code, r)
            c = r["choices"][0]
            assert c["finish_reason"] == "length", c
            assert r["usage"]["completion_tokens"] == 24, r["usage"]
            state["text"] = c["message"]["content"]
            _code2, r2 = request(chat, base_req)
            assert r2["choices"][0]["message"]["content"] == state["text"], "not deterministic"
            return repr(state["text"])

        def streamed() -> str:
            t = time.monotonic()
            first: float | None = None
            parts: list[str] = []
            finish = None
            for ch in sse(chat, {**base_req, "stream": True}):
                for choice in ch["choices"]:
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.monotonic() - t
                    parts.append(piece)
                    finish = choice.get("finish_reason") or finish
            figures["ttft_ms"] = round(1000 * (first or 0), 1)
            figures["stream_24_tokens_ms"] = round(1000 * (time.monotonic() - t), 1)
            joined = "".join(parts)
            assert joined == state["text"], (joined, state["text"])
            assert finish == "length", finish
            return f"{len(parts)} chunks, joined == non-streamed"

        def length5() -> str:
            code, r = request(chat, {**base_req, "max_tokens": 5})
            assert code == 200, r
            assert r["choices"][0]["finish_reason"] == "length", r
            assert r["usage"]["completion_tokens"] == 5, r["usage"]
            return f"usage={r['usage']['prompt_tokens']}+{r['usage']['completion_tokens']}"

        def stop() -> str:
            text = state["text"]
            # A stop string from the middle of the known greedy output.
            k = len(text) // 2
            stop_s = text[k:k + 3]
            code, r = request(chat, {**base_req, "stop": [stop_s]})
            c = r["choices"][0]
            assert code == 200 and c["finish_reason"] == "stop", c
            assert c["stop_reason"] == stop_s, c
            assert c["message"]["content"] == text[: text.index(stop_s)], c
            return f"stop={stop_s!r} -> {c['message']['content']!r}"

        def completions() -> str:
            body = {"model": str(model), "prompt": "The quick brown", "max_tokens": 8,
                    "temperature": 0}
            code, r = request(f"{base}/v1/completions", body)
            assert code == 200 and r["object"] == "text_completion", r
            assert r["usage"]["completion_tokens"] == 8, r["usage"]
            return repr(r["choices"][0]["text"])

        def malformed() -> str:
            seen = []
            for bad in ("hello", [{"role": "wizard", "content": "x"}], []):
                code, r = request(chat, {"model": str(model), "messages": bad, "max_tokens": 4})
                assert code == 400 and r["error"]["code"] == 400, (bad, code, r)
                seen.append(r["error"]["type"])
            return f"400 types={seen}"

        def include_usage() -> str:
            chunks = list(sse(chat, {**base_req, "max_tokens": 6, "stream": True,
                                     "stream_options": {"include_usage": True}}))
            last = chunks[-1]
            assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6, last
            assert all(c.get("usage") is None for c in chunks[:-1]), "usage before the end"
            return f"last chunk usage={last['usage']}"

        for name, fn in [("chat non-streamed", non_streamed), ("chat streamed", streamed),
                         ("max_tokens=5", length5), ("stop", stop),
                         ("completions", completions), ("malformed -> 400", malformed),
                         ("include_usage", include_usage)]:
            check(name, fn)
        tree = [proc.pid, *children(proc.pid)]
        figures["rss_tree_mib"], figures["pss_tree_mib"] = memory_mib(tree)
    finally:
        tree = [proc.pid, *children(proc.pid)]
        t = time.monotonic()
        # SIGTERM to the API server only: it shuts its engine children down
        # itself; we then wait for all of them so the port and memory are free.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in tree[1:] if Path(f"/proc/{p}").exists()]
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        figures["shutdown_s"] = round(time.monotonic() - t, 1)
        figures["leftover_children"] = left

    for name, ok, info in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {info}")
    print(json.dumps(figures))
    failed = sum(not ok for _, ok, _ in results)
    print(f"smoke: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
