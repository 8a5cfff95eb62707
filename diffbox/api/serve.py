"""`python -m diffbox serve`: RunPod's endpoint API (diffbox.api.http_api) on this machine, jobs
run by this process's worker, so a client sees what a RunPod endpoint shows: progress in
`/status`, `/cancel`, `/stream`. The runpod SDK's own local server (`handler.py
--rp_serve_api`) shows no progress and cannot cancel.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from .. import runtime
from .http_api import LocalJobs, create_app


def serve(host: str, port: int, api_key: str | None = None) -> None:
    # Before the server: ComfyUI (and vLLM) boot while it starts, and a warm-up runs first.
    app = create_app(LocalJobs(runtime.service()), api_key=api_key)
    # uvicorn re-raises SIGTERM once it has shut down; exiting through Python instead runs the
    # exit hook that stops the backends (they run in sessions of their own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level="warning")
