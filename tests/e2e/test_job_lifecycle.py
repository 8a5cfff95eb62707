"""Progress, cancellation, timeouts and backend failures, through `Service` in this process.

Progress, cancel and timeout run on both legs (on the real one the sampler is tests/comfyui_env's
tiny checkpoint). The two that inject a fault at a given sampler step (a dropped WebSocket, ComfyUI
dying) need the fake's controls; their real-leg counterparts are test_wire_faults.py and
test_comfyui_killed.py, which act when the first step is reported.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from diffbox.config import Settings
from diffbox.service import Service
from tests.conftest import TEST_INPUT, ComfyTarget, free_port
from tests.fakes.comfyui import write_comfyui_dir
from tests.fakes.comfyui.faults import set_fault
from tests.jobkit import job_files, sampler_graph, sampling, sampling_fake, settings


@pytest.fixture
def comfy(comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    with sampling(comfyui, step_delay_s=0.05) as target:
        yield target


@pytest.fixture
def fake_comfy(fake_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    with sampling_fake(fake_comfyui, step_delay_s=0.05) as fake:
        yield fake


def _queue_ids(url: str) -> list[str]:
    body = requests.get(f"{url}/queue", timeout=5).json()
    return [item[1] for item in body["queue_running"] + body["queue_pending"]]


def _left(comfy: ComfyTarget, service: Service, job_id: str) -> list[Path]:
    """The job's files in ComfyUI's folders: its outputs' folder, and the worker's inputs."""
    assert comfy.base_dir is not None and service.comfy_inputs is not None
    inputs = comfy.base_dir / "input" / service.comfy_inputs.folder
    return [*job_files(comfy, job_id), *(inputs.iterdir() if inputs.exists() else [])]


async def _next_job_succeeds(service: Service) -> None:
    result = await service.run("after", TEST_INPUT["input"])
    assert "error" not in result, result
    assert len(result["images"]) == 2


async def test_progress_is_monotonic_and_reports_steps(comfy: ComfyTarget, tmp_path: Path) -> None:
    service = Service(settings(comfy, tmp_path))
    updates: list[dict[str, Any]] = []
    result = await service.run("progress", {"workflow": sampler_graph(60)}, updates.append)
    assert "error" not in result, result
    assert isinstance(result["seed"], int) and result["seeds"] == {"5": result["seed"]}
    stages = [u["stage"] for u in updates]
    assert stages[0] == "inputs" and "running" in stages and stages[-1] == "uploading"
    assert [u["seq"] for u in updates] == sorted(u["seq"] for u in updates)
    assert [u["percent"] for u in updates] == sorted(u["percent"] for u in updates)
    sampling = [u for u in updates if u.get("node") == "KSampler" and "step" in u]
    assert sampling and all(u["steps"] == 60 for u in sampling)
    assert updates[-1]["percent"] >= 95


async def test_cancelling_the_task_stops_our_prompt_and_cleans_up(comfy: ComfyTarget, tmp_path: Path) -> None:
    service = Service(settings(comfy, tmp_path))
    running = threading.Event()

    def on_progress(update: dict[str, Any]) -> None:
        if update.get("step"):
            running.set()

    task = asyncio.ensure_future(service.run("cancel-me", {"workflow": sampler_graph(400)}, on_progress))
    assert await asyncio.to_thread(running.wait, 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _queue_ids(comfy.url) == []
    assert _left(comfy, service, "cancel-me") == []
    assert not (tmp_path / "work" / "cancel-me").exists()
    await _next_job_succeeds(service)


async def test_stop_event_returns_cancelled(comfy: ComfyTarget, tmp_path: Path) -> None:
    service = Service(settings(comfy, tmp_path))
    stop = threading.Event()
    updates: list[dict[str, Any]] = []

    def on_progress(update: dict[str, Any]) -> None:
        updates.append(update)
        if update.get("step"):
            stop.set()

    result = await service.run("stop-me", {"workflow": sampler_graph(400)}, on_progress, stop)
    assert result["error"]["type"] == "cancelled"
    # The last update says how the job ended, not the "uploading" of its partial outputs.
    last = updates[-1]
    assert last["stage"] == "cancelled" and last["seq"] == max(u["seq"] for u in updates)
    assert 5 < last["percent"] < 95 and "step" not in last
    assert _queue_ids(comfy.url) == []
    assert _left(comfy, service, "stop-me") == []


async def test_timeout_interrupts_and_reports(comfy: ComfyTarget, tmp_path: Path) -> None:
    service = Service(settings(comfy, tmp_path, job_timeout_s=1.0))
    updates: list[dict[str, Any]] = []
    result = await service.run("slow", {"workflow": sampler_graph(400)}, updates.append)
    assert result["error"]["type"] == "timeout"
    assert updates[-1]["stage"] == "timeout"
    assert "DIFFBOX_JOB_TIMEOUT_S" in result["error"]["message"]
    assert _queue_ids(comfy.url) == []
    assert _left(comfy, service, "slow") == []
    await _next_job_succeeds(Service(settings(comfy, tmp_path)))


async def test_dropped_websocket_reconnects_and_finishes(fake_comfy: ComfyTarget, tmp_path: Path) -> None:
    comfy = fake_comfy
    service = Service(settings(comfy, tmp_path))
    set_fault(comfy.url, "drop_ws", node_class="KSampler", step=2)
    result = await service.run("dropped", {"workflow": sampler_graph(6)})
    assert "error" not in result, result
    assert [i["filename"] for i in result["images"]] == ["sampled_00001_.png"]


async def test_comfyui_dying_mid_job_fails_it_and_the_next_job_gets_a_fresh_one(
    fake_comfyui: ComfyTarget, tmp_path: Path
) -> None:
    comfy_dir = tmp_path / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    (comfy_dir / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (comfy_dir / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"")
    port = free_port()
    service = Service(Settings(comfyui_dir=comfy_dir, comfyui_port=port, work_dir=tmp_path / "work",
                               startup_timeout_s=60, comfyui_args=["--cpu"]))
    service.start()
    try:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(service.comfy.supervisor.ensure_ready, 60)  # type: ignore[union-attr]
        first_pid = service.comfy.supervisor.process.pid  # type: ignore[union-attr]
        set_fault(url, "die", node_class="KSampler", step=2)
        result = await service.run("dies", {"workflow": sampler_graph(6)})
        error = result["error"]
        assert error["type"] == "backend"
        assert error["message"] == "comfyui exited with code 3 during the job"
        assert error["details"]["exit_code"] == 3
        assert "To see the GUI go to" in error["details"]["log_tail"]
        await _next_job_succeeds(service)
        assert service.comfy.supervisor.process.pid != first_pid  # type: ignore[union-attr]
    finally:
        service.stop()


async def test_a_worker_stopped_just_after_a_result_cleans_up_before_it_stops(comfy: ComfyTarget,
                                                                               tmp_path: Path) -> None:
    """A job's clean-up in ComfyUI runs a moment after its result; a worker stopping in that
    moment (the `diffbox` command after its one job) does it first, while ComfyUI still answers."""
    service = Service(settings(comfy, tmp_path))
    before = set(requests.get(f"{comfy.url}/history", timeout=5).json())
    result = await service.run("stopping", TEST_INPUT["input"])
    assert "error" not in result, result
    service.stop()
    assert set(requests.get(f"{comfy.url}/history", timeout=5).json()) <= before
    assert _left(comfy, service, "stopping") == []
