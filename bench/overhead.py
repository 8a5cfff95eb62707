"""Handler overhead per job: end-to-end time minus ComfyUI's own execution time.

    uv run python bench/overhead.py                 # against the fake ComfyUI (started here)
    uv run python bench/overhead.py --url http://127.0.0.1:8188 --jobs 50

Each job is a one-image graph (LoadImage -> ImageInvert -> SaveImage) with an inline input,
sent through `handler.handler` in this process, as the RunPod SDK calls it. ComfyUI's own
execution time comes from its `execution_start`/`execution_success` timestamps, so what is
left is ours: validation, upload, WebSocket handling, reading and encoding the output.
Prints p50/p95 overhead and the process's peak RSS. Target: p50 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _job(index: int, image: str) -> dict[str, Any]:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
    }
    return {"id": f"bench-{index}", "input": {"workflow": graph, "images": [{"name": "in.png", "image": image}]}}


async def _measure(jobs: int) -> list[float]:
    import handler  # imported late: its import is the worker's cold start

    image = handler_input_image()
    overheads = []
    for index in range(jobs + 1):
        t0 = time.perf_counter()
        result = await handler.handler(_job(index, image))
        total = time.perf_counter() - t0
        if "error" in result:
            raise SystemExit(f"job failed: {result['error']}")
        if index == 0:
            continue  # the first job also waits for ComfyUI's start-up
        overheads.append(total - result["timings"]["comfyui_exec_s"])
    return overheads


def handler_input_image() -> str:
    import json

    return str(json.loads((REPO / "test_input.json").read_text())["input"]["images"][0]["image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI (default: start the test fake)")
    parser.add_argument("--dir", help="that ComfyUI's folder, when it is on this disk")
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.url:
            os.environ["DIFFBOX_COMFYUI_URL"] = args.url
            if args.dir:
                os.environ["DIFFBOX_COMFYUI_DIR"] = args.dir
        else:
            from tests.fakes.comfyui import start_fake_comfyui

            fake = stack.enter_context(start_fake_comfyui(work / "comfyui"))
            os.environ["DIFFBOX_COMFYUI_URL"] = fake.url
            os.environ["DIFFBOX_COMFYUI_DIR"] = str(work / "comfyui")
        os.environ["DIFFBOX_WORK_DIR"] = str(work / "jobs")
        os.environ.setdefault("DIFFBOX_LOG_LEVEL", "WARNING")
        overheads = asyncio.run(_measure(args.jobs))
    ms = sorted(o * 1000 for o in overheads)
    p95 = ms[max(0, round(0.95 * len(ms)) - 1)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"jobs: {len(ms)}  overhead p50: {statistics.median(ms):.1f} ms  p95: {p95:.1f} ms  "
          f"max: {ms[-1]:.1f} ms  peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
