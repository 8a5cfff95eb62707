"""RunPod serverless entry point: a thin adapter around `diffbox.service`.

`python handler.py` runs `test_input.json` once (the SDK's local mode);
`python handler.py --rp_serve_api` serves the SDK's local API (/run, /runsync, /status, /stream);
on RunPod the same command takes jobs from the queue.

The handler's kind follows the endpoint's settings (the SDK fixes one per worker): a plain
async handler where only ComfyUI workflows are served (results in the official ComfyUI
worker's shape), an async generator where chat is (token chunks; with
`return_aggregate_stream`, /run and /runsync return the list of chunks; any other job's
result is then the one chunk).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from diffbox.errors import as_text
from diffbox.runtime import service

# Before the SDK's import (a second or more): the backends boot meanwhile.
SERVICE = service()

# The SDK logs each job's output (presigned URLs) and progress at DEBUG, its default level.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402  after the line above: the SDK reads RUNPOD_LOG_LEVEL on import

# Progress goes to RunPod's job-status API, which exists only where RunPod runs the worker:
# in the SDK's local modes each update would be a failed POST to a placeholder URL.
ON_RUNPOD = "RUNPOD_WEBHOOK_POST_OUTPUT" in os.environ


def _reporter(job: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def report(payload: dict[str, Any]) -> None:
        if ON_RUNPOD:
            runpod.serverless.progress_update(job, payload)

    return report


def _for_runpod(result: Any) -> Any:
    # A chunk may be a string: the OpenAI passthrough streams server-sent events as text.
    return {**result, "error": as_text(result["error"])} if isinstance(result, dict) and "error" in result else result


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = _for_runpod(await SERVICE.run(job["id"], job.get("input"), _reporter(job)))
    return result


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    async for chunk in SERVICE.stream(job["id"], job.get("input"), _reporter(job)):
        yield _for_runpod(chunk)


def runpod_config() -> dict[str, Any]:
    return {
        "handler": stream_handler if SERVICE.settings.serves("chat") else handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": lambda _current: SERVICE.settings.job_concurrency(),
    }


if __name__ == "__main__":
    # The SDK's local API (uvicorn) re-raises SIGTERM once it has shut down, which would end
    # the process without running the exit hook that stops the backends (they run in sessions
    # of their own, so the signal does not reach them). The queue worker sets its own handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    runpod.serverless.start(runpod_config())
