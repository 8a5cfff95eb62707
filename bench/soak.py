"""A soak: many jobs through the RunPod SDK's production loop, with cancels and timeouts mixed in,
and what the worker holds at the end compared with what it held after warming up.

    uv run python bench/soak.py                          # the real ComfyUI of `make comfyui-env`
    uv run python bench/soak.py --small 200 --video 4    # shorter
    uv run python bench/soak.py --url http://127.0.0.1:8188 --dir COMFYUI_FOLDERS_BASE
    uv run python bench/soak.py --fake --small 50 --video 2 --every 20   # a trial of the script itself

`python handler.py` runs as RunPod runs it (runpod.serverless.start), taking jobs from the
loopback stand-in of RunPod's job API (tests/fakes/runpod_api.py). Jobs, one at a time:

- small: a 16x16 PNG of a colour of its own through ImageInvert; the output is decoded and must
  be that colour's inverse.
- video: EmptyImage -> ImageAddNoise -> CreateVideo -> SaveVideo, 32 frames of 128x128 mp4;
  decoded, it must have 32 frames of that size.
- cancel (every `--every`th job): a sampler of 10000 steps, stopped through RunPod's job-stop
  channel at its first step: no result may be posted, and ComfyUI's queue must empty.
- timeout (likewise, offset): the same sampler, stopped by DIFFBOX_JOB_TIMEOUT_S: its result
  must be a timeout error.

Printed: every check's failures (none expected), and the worker process's RSS, open file
descriptors and threads after the warm-up (the first `--warmup` jobs) and at the end, and the
files in ComfyUI's input, output and temp folders at the start and the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import ComfyTarget, comfy_folder_files, free_port, production_worker, worker_env  # noqa: E402
from tests.fakes.runpod_api import FakeRunpodApi  # noqa: E402
from tests.jobkit import sampler_graph  # noqa: E402

TIMEOUT_S = 20.0
ENDLESS_STEPS = 10000
VIDEO_FRAMES, VIDEO_SIZE = 32, 128
MB = 1024 * 1024


def png_b64(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def small_job(i: int) -> tuple[dict[str, Any], tuple[int, int, int]]:
    color = (i % 256, (i * 7) % 256, (i * 13) % 256)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "soak"}},
    }
    return {"workflow": graph, "images": [{"name": "in.png", "image": png_b64(color)}]}, color


def video_job(seed: int) -> dict[str, Any]:
    return {"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": VIDEO_SIZE, "height": VIDEO_SIZE,
                                                     "batch_size": VIDEO_FRAMES, "color": 0x808080}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": seed, "strength": 0.5}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 16.0}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "soak",
                                                    "format": "mp4", "codec": "h264"}},
    }}


def small_ok(output: dict[str, Any], color: tuple[int, int, int]) -> bool:
    from PIL import Image

    [image] = output["images"]
    pixels = Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB")
    expected = tuple(255 - c for c in color)
    low, high = zip(*pixels.getextrema(), strict=True)
    return all(abs(v - e) <= 1 for v, e in zip(low + high, expected + expected, strict=True))


def video_ok(output: dict[str, Any]) -> bool:
    import av

    [video] = output["images"]
    with av.open(io.BytesIO(base64.b64decode(video["data"]))) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames) == VIDEO_FRAMES and (frames[0].width, frames[0].height) == (VIDEO_SIZE, VIDEO_SIZE)


def holdings(pid: int) -> dict[str, float]:
    proc = psutil.Process(pid)
    return {"rss_mb": round(proc.memory_info().rss / MB, 2), "fds": proc.num_fds(), "threads": proc.num_threads()}


def queue_empty(url: str) -> bool:
    return bool(requests.get(f"{url}/queue", timeout=10).json() == {"queue_running": [], "queue_pending": []})


def wait_for(predicate: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    return None


@contextlib.contextmanager
def comfyui(args: argparse.Namespace, work: Path) -> Iterator[ComfyTarget]:
    if args.url:
        yield ComfyTarget(args.url.rstrip("/"), Path(args.dir), is_fake=False)
        return
    if args.fake:
        from tests.fakes.comfyui import start_fake_comfyui
        from tests.jobkit import sampling_fake

        with start_fake_comfyui(work / "fake") as fake, \
                sampling_fake(ComfyTarget(fake.url, work / "fake", is_fake=True), 0.05) as target:
            yield target
        return
    from tests.realcomfy import installed, start_real_comfyui

    with start_real_comfyui(installed(), work / "comfyui", free_port()) as real:
        yield ComfyTarget(real.url, real.base_dir, is_fake=False)


def one_job(api: FakeRunpodApi, comfy: ComfyTarget, job_id: str, kind: str, i: int) -> str | None:
    """Run one job of `kind` through the worker; what went wrong, or None."""
    if kind == "small":
        job, color = small_job(i)
        api.add_job(job_id, job)
        final = wait_for(lambda: api.final(job_id), 120)
        if not (final and "error" not in final.get("output", {}) and small_ok(final["output"], color)):
            return f"{job_id}: {str(final)[:300]}"
    elif kind == "video":
        api.add_job(job_id, video_job(i))
        final = wait_for(lambda: api.final(job_id), 300)
        if not (final and "error" not in final.get("output", {}) and video_ok(final["output"])):
            return f"{job_id}: {str(final)[:300]}"
    elif kind == "cancel":
        api.add_job(job_id, {"workflow": sampler_graph(ENDLESS_STEPS)})
        if not wait_for(lambda: any(b.get("output", {}).get("step") for b in api.posts_for(job_id)), 120):
            return f"{job_id}: never reached a step"
        api.stop_job(job_id)
        if not wait_for(lambda: queue_empty(comfy.url), 30):
            return f"{job_id}: its prompt stayed in ComfyUI's queue"
        time.sleep(1)  # a result posted late would show now
        if api.final(job_id) is not None:
            return f"{job_id}: a cancelled job posted a result"
    else:
        api.add_job(job_id, {"workflow": sampler_graph(ENDLESS_STEPS)})
        final = wait_for(lambda: api.final(job_id), TIMEOUT_S + 120)
        error = json.loads(final["error"]) if final and isinstance(final.get("error"), str) else {}
        if error.get("type") != "timeout":
            return f"{job_id}: {str(final)[:300]}"
    return None


def run(args: argparse.Namespace, comfy: ComfyTarget, work: Path) -> dict[str, Any]:
    assert comfy.base_dir is not None
    api = FakeRunpodApi().start()
    env = worker_env(comfy, work / "worker", DIFFBOX_JOB_TIMEOUT_S=str(TIMEOUT_S), DIFFBOX_LOG_LEVEL="WARNING",
                     **api.env())
    files_at_start = len(comfy_folder_files(comfy.base_dir))
    failures: list[str] = []
    counts = {"small": 0, "video": 0, "cancel": 0, "timeout": 0}
    warm: dict[str, float] = {}
    plan = ["small"] * args.small
    for k in range(args.video):  # spread the video jobs through the run
        plan.insert(round((k + 1) * len(plan) / (args.video + 1)), "video")
    for k in range(args.every, len(plan), args.every):
        plan[k:k] = ["cancel" if (k // args.every) % 2 else "timeout"]
    t0 = time.monotonic()
    try:
        with production_worker(env, work / "worker.log") as worker:
            for i, kind in enumerate(plan):
                failure = one_job(api, comfy, f"soak-{i}-{kind}", kind, i)
                if failure:
                    failures.append(failure)
                counts[kind] += 1
                if i + 1 == args.warmup:
                    warm = holdings(worker.pid)
                if (i + 1) % 100 == 0:
                    print(f"{i + 1}/{len(plan)} jobs, {time.monotonic() - t0:.0f} s, {len(failures)} failures",
                          flush=True)
            time.sleep(2)  # ComfyUI's side of the last job goes just after its result
            end = holdings(worker.pid)
    finally:
        api.close()
    return {
        "jobs": counts, "failures": failures, "seconds": round(time.monotonic() - t0),
        "after_warmup": warm, "end": end,
        "rss_drift_mb": round(end["rss_mb"] - warm["rss_mb"], 2) if warm else None,
        "comfyui_files": {"start": files_at_start, "end": len(comfy_folder_files(comfy.base_dir))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--video", type=int, default=20)
    parser.add_argument("--every", type=int, default=100, help="a cancel or a timeout job after every this many")
    parser.add_argument("--warmup", type=int, default=50, help="jobs before the first holdings are taken")
    parser.add_argument("--url", help="a running ComfyUI (default: start the real one of `make comfyui-env`)")
    parser.add_argument("--dir", help="the folder of that ComfyUI's input, output and temp folders")
    parser.add_argument("--fake", action="store_true", help="the fake ComfyUI (tests/fakes): figures mean nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffbox-soak-") as tmp, comfyui(args, Path(tmp)) as comfy:
        report = run(args, comfy, Path(tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
