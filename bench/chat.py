"""Chat on a real vLLM: the worker's cold start, time to first streamed chunk, and what the
handler adds per chunk over vLLM's own stream.

    bash tests/vllm_env/setup.sh                 # the CPU vLLM and its tiny model (once)
    uv run python bench/chat.py [--runs 20] [--tokens 200]

The worker is `handler.py` imported in this process (its import is the cold start: it starts
vLLM from DIFFBOX_VLLM_COMMAND, as on RunPod); jobs go through `handler.stream_handler`, as
the RunPod SDK calls it. Each run streams the same greedy answer twice, alternating: once
read straight from vLLM's /v1/chat/completions (aiohttp, one JSON parse per event: what any
client pays), once through the handler. The difference, per chunk, is the handler's cost:
wall clock (noisy: vLLM's own pace varies) and CPU time of the thread running both (steadier).
Time to the first chunk is taken on short answers (8 tokens), alternating the same way: on a
small CPU machine a long generation starves vLLM's own API server, which then sends late
whatever it has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MESSAGES = [{"role": "user", "content": "Tell a story."}]


def _worker_env(cache: Path, port: int, work: str) -> dict[str, str]:
    return {
        "DIFFBOX_BACKENDS": "vllm",
        "DIFFBOX_VLLM_COMMAND": f"{cache / 'vllm-venv/bin/python'} -m vllm.entrypoints.openai.api_server",
        "DIFFBOX_VLLM_MODEL": str(cache / "tiny-llama"),
        "DIFFBOX_VLLM_ARGS": "--dtype bfloat16 --max-model-len 256 --enforce-eager",
        "DIFFBOX_VLLM_PORT": str(port),
        "DIFFBOX_STARTUP_TIMEOUT_S": "600",
        "DIFFBOX_WORK_DIR": work,
        "DIFFBOX_LOG_LEVEL": "WARNING",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }


async def _direct(url: str, model: str, tokens: int) -> tuple[float, float, int]:
    """(first chunk s, whole stream s, chunks) read straight from vLLM."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "seed": 1, "stream": True}
    t0 = time.perf_counter()
    first, chunks = 0.0, 0
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if any(c["delta"].get("content") for c in event["choices"]):
                chunks += 1
                first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


async def _through_handler(handler: Any, index: int, tokens: int) -> tuple[float, float, int]:
    job = {"id": f"bench-{index}", "input": {"workflow": "chat", "messages": MESSAGES, "max_tokens": tokens,
                                            "temperature": 0, "seed": 1, "stream": True}}
    t0 = time.perf_counter()
    first, chunks = 0.0, 0
    async for chunk in handler.stream_handler(job):
        if "error" in chunk:
            raise SystemExit(f"job failed: {chunk['error']}")
        if chunk["delta"]:
            chunks += 1
            first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.conftest import free_port

    cache = Path(args.cache_dir)
    if not (cache / "vllm-venv/bin/python").exists() or not (cache / "tiny-llama/config.json").exists():
        raise SystemExit(f"no test vLLM in {cache}: run `bash tests/vllm_env/setup.sh`")
    port = free_port()
    os.environ.update(_worker_env(cache, port, tempfile.mkdtemp(prefix="bench-chat-")))
    t0 = time.perf_counter()
    import handler  # the worker's cold start: vLLM starts here, in the background

    service = handler.SERVICE
    vllm = service.vllm
    assert vllm is not None
    await asyncio.to_thread(vllm.supervisor.ensure_ready, 600)
    ready_s = time.perf_counter() - t0
    [first] = [c async for c in handler.stream_handler(
        {"id": "cold", "input": {"workflow": "chat", "prompt": "Hi", "max_tokens": 1}})]
    assert "error" not in first, first
    cold_s = time.perf_counter() - t0
    url, model = vllm.url, str(vllm.model)
    direct, worker = [], []
    first_direct, first_worker = [], []
    cpu_direct = cpu_worker = 0.0
    for index in range(args.runs + 1):
        short_direct = await _direct(url, model, 8)
        short_worker = await _through_handler(handler, index, 8)
        c0 = time.thread_time()
        d = await _direct(url, model, args.tokens)
        c1 = time.thread_time()
        w = await _through_handler(handler, index, args.tokens)
        c2 = time.thread_time()
        if index == 0:
            continue  # warms both paths' imports and connections
        direct.append(d)
        worker.append(w)
        first_direct.append(short_direct[0])
        first_worker.append(short_worker[0])
        cpu_direct += c1 - c0
        cpu_worker += c2 - c1
    service.stop()
    # vLLM may send two tokens in one event when its reader lags: counts can differ by a few.
    chunks = statistics.median(r[2] for r in worker)
    chunks_direct, chunks_worker = sum(r[2] for r in direct), sum(r[2] for r in worker)

    def med(rows: list[tuple[float, float, int]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    return {
        "vllm_ready_s": round(ready_s, 1),
        "cold_start_to_first_result_s": round(cold_s, 1),
        "runs": args.runs,
        "chunks_per_stream": chunks,
        "first_chunk_ms": {"vllm": round(1000 * statistics.median(first_direct), 1),
                           "handler": round(1000 * statistics.median(first_worker), 1)},
        "stream_ms": {"vllm": round(1000 * med(direct, 1), 1), "handler": round(1000 * med(worker, 1), 1)},
        "added_per_chunk_us": {
            "wall": round(1e6 * (med(worker, 1) - med(direct, 1)) / chunks, 1),
            "cpu": round(1e6 * (cpu_worker / chunks_worker - cpu_direct / chunks_direct), 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default_cache = os.environ.get("DIFFBOX_TEST_CACHE") or str(Path.home() / ".cache/diffbox-test")
    parser.add_argument("--cache-dir", default=default_cache)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens per answer (the context is 256)")
    print(json.dumps(asyncio.run(_run(parser.parse_args())), indent=1))


if __name__ == "__main__":
    main()
