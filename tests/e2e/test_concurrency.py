"""Twenty jobs at once against a ComfyUI that runs one prompt at a time: every job gets its own
outputs (each input image is distinct, each output must be the inversion of its own input),
progress never crosses jobs, nothing is lost.

How the concurrency is driven: the runpod SDK's local API server (rp_fastapi) runs a `/run`
job only when `/status` is polled and `--rp_api_concurrency` above 1 crashes it (uvicorn
workers need an import string), but its one event loop serves concurrent `/runsync` requests,
each awaiting our async handler, which runs the job in a thread: 20 concurrent `/runsync`
requests are 20 concurrent jobs in one worker. Progress updates only reach a debug log line
there, so the progress check drives 20 jobs with asyncio.gather over `Service.run` in this
process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from diffbox import service as service_module
from diffbox.progress import ProgressTracker
from diffbox.service import Service
from tests.conftest import ComfyTarget, RunpodApi
from tests.jobkit import (
    INVERT_GRAPH,
    Baseline,
    invert_job,
    is_inversion_of,
    png_b64,
    queue_ids,
    sampler_graph,
    sampling_fake,
    settings,
)

JOBS = 20
IMAGES = [png_b64((10 * i, 255 - 10 * i, (37 * i) % 256), (24 + i, 16)) for i in range(JOBS)]


def test_twenty_concurrent_runsync_jobs_each_get_their_own_outputs(rp_api: RunpodApi, comfyui: ComfyTarget) -> None:
    rp_api.timeout_s = 300
    with ThreadPoolExecutor(JOBS) as pool:
        bodies = list(pool.map(lambda image: rp_api.runsync(invert_job(image)), IMAGES))
    assert len({body["id"] for body in bodies}) == JOBS
    for image, body in zip(IMAGES, bodies, strict=True):
        assert body["status"] == "COMPLETED", body
        [output] = body["output"]["images"]
        assert is_inversion_of(output["data"], image)
    assert queue_ids(comfyui.url) == ([], [])
    # They really ran at the same time: the worker's own log says when each one ran.
    ran = [(e["ts"] - e["total_s"], e["ts"]) for e in log_events(rp_api, "job done")
           if e["job_id"] in {body["id"] for body in bodies}]
    assert len(ran) == JOBS and most_at_once(ran) > 1


def log_events(api: RunpodApi, message: str) -> list[dict[str, Any]]:
    lines = [line for line in api.logs().splitlines() if line.startswith("{")]
    return [e for e in map(json.loads, lines) if e.get("msg") == message]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


@pytest.fixture
def comfy(fake_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    with sampling_fake(fake_comfyui, step_delay_s=0.005) as fake:
        yield fake


def own_graph(steps: int) -> dict[str, Any]:
    """A sampler with its own step count (so its progress says whose it is) beside the inversion."""
    graph = {f"1{k}": node for k, node in sampler_graph(steps).items()}
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = [f"1{value[0]}", value[1]]
    return {**graph, **INVERT_GRAPH}


async def test_twenty_jobs_gathered_in_process_keep_their_outputs_and_progress_apart(
    comfy: ComfyTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unthrottled, so that every step of every job is reported and can be checked.
    monkeypatch.setattr(service_module, "ProgressTracker", functools.partial(ProgressTracker, interval_s=0.0))
    service = Service(settings(comfy, tmp_path))
    await service.run("warm", invert_job(IMAGES[0]))
    before = Baseline.take()
    updates: list[list[dict[str, Any]]] = [[] for _ in range(JOBS)]

    def reporter(i: int) -> Any:
        def report(update: dict[str, Any]) -> None:
            updates[i].append(update)
        return report

    steps = [5 + i for i in range(JOBS)]

    async def job(i: int) -> dict[str, Any]:
        t0 = time.monotonic()
        result = await service.run(f"job-{i}", {**invert_job(IMAGES[i]), "workflow": own_graph(steps[i])},
                                   reporter(i))
        spans.append((t0, time.monotonic()))
        return result

    spans: list[tuple[float, float]] = []
    results = await asyncio.gather(*[job(i) for i in range(JOBS)])
    assert most_at_once(spans) > 1
    for i, result in enumerate(results):
        assert "error" not in result, result
        inverted = [o for o in result["images"] if o["filename"].startswith("inverted")]
        assert len(inverted) == 1 and is_inversion_of(inverted[0]["data"], IMAGES[i])
        assert len(result["images"]) == 2
        sampling = [u for u in updates[i] if "steps" in u]
        # Every step of its own sampler, and none of another job's.
        assert sampling and {u["steps"] for u in sampling} == {steps[i]}, (i, sampling)
        assert max(u["step"] for u in sampling) == steps[i]
        assert [u["seq"] for u in updates[i]] == sorted(u["seq"] for u in updates[i])
        assert [u["percent"] for u in updates[i]] == sorted(u["percent"] for u in updates[i])
        assert updates[i][-1]["stage"] == "uploading"
    before.assert_nothing_left(comfy, tmp_path / "work", *[f"job-{i}" for i in range(JOBS)])
