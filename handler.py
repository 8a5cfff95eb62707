"""RunPod serverless entry point: a thin adapter around `diffbox.service`.

`python handler.py` runs `test_input.json` once (the SDK's local mode);
`python handler.py --rp_serve_api` serves the SDK's local API (/run, /runsync, /status, /stream);
on RunPod the same command takes jobs from the queue.
"""

from __future__ import annotations

from typing import Any

import runpod

from diffbox.runtime import service

SERVICE = service()


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    def report(payload: dict[str, Any]) -> None:
        runpod.serverless.progress_update(job, payload)

    return await SERVICE.run(job["id"], job.get("input"), report)


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
