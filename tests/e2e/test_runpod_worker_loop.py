"""The worker as RunPod runs it: `python handler.py` in the SDK's production loop, against a
loopback stand-in of RunPod's job API (tests/fakes/runpod_api.py) and ComfyUI (fake or real:
on the real one the sampler is tests/comfyui_env's tiny checkpoint).

This is where progress really travels (`progress_update` posts `IN_PROGRESS` outputs) and
where RunPod's cancel really arrives (the job-stop channel cancels the handler's task).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import TEST_INPUT, ComfyTarget, production_worker, worker_env
from tests.fakes.runpod_api import FakeRunpodApi
from tests.jobkit import sampler_graph, sampling


@pytest.fixture(scope="module")
def worker(runpod_api: FakeRunpodApi, comfyui: ComfyTarget,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    tmp = tmp_path_factory.mktemp("rp-loop")
    with production_worker(worker_env(comfyui, tmp / "work", **runpod_api.env()), tmp / "worker.log") as proc:
        yield proc


def _wait_for(predicate: Any, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_progress_posts_reach_runpod_and_the_result_follows(
    runpod_api: FakeRunpodApi, worker: subprocess.Popen[bytes], comfyui: ComfyTarget
) -> None:
    steps = 60 if comfyui.is_fake else 12  # a real first job also loads the checkpoint
    with sampling(comfyui, step_delay_s=0.05):
        runpod_api.add_job("job-progress", {"workflow": sampler_graph(steps)})
        final = _wait_for(lambda: runpod_api.final("job-progress"))
    assert "error" not in final, final
    assert final["output"]["images"][0]["filename"] == "sampled_00001_.png"
    updates = [b["output"] for b in runpod_api.posts_for("job-progress") if b.get("status") == "IN_PROGRESS"]
    # Posts come from separate threads and may arrive out of order: seq puts them back.
    updates.sort(key=lambda u: u["seq"])
    assert len({u["seq"] for u in updates}) == len(updates) >= 3
    assert [u["percent"] for u in updates] == sorted(u["percent"] for u in updates)
    assert any(u["stage"] == "running" and u.get("node") == "KSampler" and u.get("steps") == steps for u in updates)


def test_runpod_cancel_stops_the_prompt_and_the_worker_goes_on(
    runpod_api: FakeRunpodApi, worker: subprocess.Popen[bytes], comfyui: ComfyTarget
) -> None:
    with sampling(comfyui, step_delay_s=0.05):
        runpod_api.add_job("job-cancel", {"workflow": sampler_graph(600)})
        _wait_for(lambda: any(b.get("output", {}).get("step") for b in runpod_api.posts_for("job-cancel")))
        runpod_api.stop_job("job-cancel")
    # The prompt leaves ComfyUI: nothing of this job runs on after the cancel.
    _wait_for(lambda: requests.get(f"{comfyui.url}/queue", timeout=5).json()
              == {"queue_running": [], "queue_pending": []}, timeout_s=20)
    assert runpod_api.final("job-cancel") is None  # a cancelled job posts no result
    assert comfyui.base_dir is not None
    assert not list((comfyui.base_dir / "output" / "diffbox").glob("job-cancel-*/*"))
    runpod_api.add_job("job-after", TEST_INPUT["input"])
    final = _wait_for(lambda: runpod_api.final("job-after"))
    assert len(final["output"]["images"]) == 2

