"""What only a real ComfyUI shows (run with `--comfyui=real`; skipped against the fake): a real
sampler's progress on a tiny random-weight checkpoint (tests/comfyui_env), interrupts inside
real sampling steps, ComfyUI killed and restarted by the worker's own supervisor, a warm-up at
start, an animated output. (Every typed request's graph through the real /prompt validation:
test_graph_validation.py, which runs in both legs.)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from diffbox.config import Settings
from diffbox.service import Service
from tests.conftest import ComfyTarget, free_port, start_runpod_api, worker_env
from tests.jobkit import INVERT_GRAPH, invert_job, is_inversion_of, job_files, png_b64, queue_ids, sampler_graph
from tests.jobkit import settings as attached
from tests.realcomfy import TINY_CHECKPOINT, installed, prepare_folders, server_args

IMAGE = png_b64((200, 30, 90), (40, 32))
# Long enough that only an interrupt ends it in the test's time (about 0.07 s a step here).
LONG_STEPS = 5000


@pytest.fixture(scope="module")
def real(real_comfyui: ComfyTarget) -> ComfyTarget:
    """The session's real ComfyUI, with the tiny checkpoint the sampler graphs load."""
    names = requests.get(f"{real_comfyui.url}/object_info/CheckpointLoaderSimple", timeout=10).json()
    if TINY_CHECKPOINT not in names["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]:
        pytest.skip(f"this ComfyUI has no checkpoints/{TINY_CHECKPOINT} (tests/comfyui_env/make_tiny_models.py)")
    return real_comfyui


def seeded(graph: dict[str, Any], seed: int = 7) -> dict[str, Any]:
    return {**graph, "5": {**graph["5"], "inputs": {**graph["5"]["inputs"], "seed": seed}}}


def started_with_step(updates: list[dict[str, Any]], stop: threading.Event) -> Any:
    """An emit that records updates and sets `stop` once the sampler has made two steps."""

    def emit(update: dict[str, Any]) -> None:
        updates.append(update)
        if update.get("step", 0) >= 2:
            stop.set()

    return emit


async def next_job_succeeds(service: Service) -> None:
    result = await service.run("next", invert_job(IMAGE))
    assert "error" not in result, result
    assert is_inversion_of(result["images"][0]["data"], IMAGE)


async def test_real_sampler_reports_its_steps(real: ComfyTarget, tmp_path: Path) -> None:
    updates: list[dict[str, Any]] = []
    result = await Service(attached(real, tmp_path)).run("sample", {"workflow": seeded(sampler_graph(6))},
                                                         updates.append)
    assert "error" not in result, result
    [image] = result["images"]
    assert (image["filename"], image["width"], image["height"]) == ("sampled_00001_.png", 64, 64)
    assert result["seeds"] == {"5": 7}
    # Updates are throttled (about one a second): which steps show depends on the machine's speed.
    steps = [(u["step"], u["steps"]) for u in updates if u.get("node") == "KSampler" and "step" in u]
    assert steps and {total for _, total in steps} == {6}
    assert [s for s, _ in steps] == sorted(s for s, _ in steps) and all(1 <= s <= 6 for s, _ in steps)
    percents = [u["percent"] for u in updates]
    assert percents == sorted(percents)


async def test_cancel_interrupts_real_sampling_and_the_next_job_runs(real: ComfyTarget, tmp_path: Path) -> None:
    service = Service(attached(real, tmp_path))
    updates: list[dict[str, Any]] = []
    stop = threading.Event()
    result = await service.run("cancel-real", {"workflow": sampler_graph(LONG_STEPS)},
                               started_with_step(updates, stop), stop)
    assert result["error"]["type"] == "cancelled", result
    assert max(u.get("step", 0) for u in updates) < LONG_STEPS
    assert queue_ids(real.url) == ([], [])
    assert job_files(real, "cancel-real") == []
    await next_job_succeeds(service)


async def test_job_timeout_interrupts_real_sampling_and_the_next_job_runs(real: ComfyTarget, tmp_path: Path) -> None:
    service = Service(attached(real, tmp_path, job_timeout_s=4))
    result = await service.run("slow-real", {"workflow": sampler_graph(LONG_STEPS)})
    assert result["error"]["type"] == "timeout", result
    assert "DIFFBOX_JOB_TIMEOUT_S" in result["error"]["message"]
    assert queue_ids(real.url) == ([], [])
    assert job_files(real, "slow-real") == []
    await next_job_succeeds(Service(attached(real, tmp_path)))


@pytest.fixture
def own_comfyui(real: ComfyTarget, tmp_path: Path) -> Iterator[Service]:
    """A worker that starts ComfyUI itself from the cached install (DIFFBOX_COMFYUI_DIR), with
    folders of its own: a second server, for the tests that kill it."""
    install = installed()
    base = tmp_path / "own"
    prepare_folders(base, install)
    service = Service(Settings(comfyui_dir=install.comfy_dir, comfyui_python=str(install.python),
                               comfyui_port=free_port(), comfyui_args=server_args(base),
                               models_dir=base / "models", work_dir=tmp_path / "work", startup_timeout_s=180))
    service.start()
    try:
        yield service
    finally:
        service.stop()


async def test_comfyui_killed_mid_job_fails_it_and_the_supervisor_restarts_it(own_comfyui: Service) -> None:
    supervisor = own_comfyui.comfy.supervisor  # type: ignore[union-attr]
    await asyncio.to_thread(supervisor.ensure_ready, 180)
    first_pid = supervisor.process.pid  # type: ignore[union-attr]
    killed = threading.Event()

    def kill_at_step_2(update: dict[str, Any]) -> None:
        if update.get("step", 0) >= 2 and not killed.is_set():
            killed.set()
            os.kill(first_pid, signal.SIGKILL)

    result = await own_comfyui.run("killed", {"workflow": sampler_graph(LONG_STEPS)}, kill_at_step_2)
    assert killed.is_set()
    error = result["error"]
    assert error["type"] == "backend", error
    assert error["message"] == "comfyui exited with code -9 during the job"
    await next_job_succeeds(own_comfyui)
    assert supervisor.process.pid != first_pid  # type: ignore[union-attr]


def test_warm_up_at_start_without_weights_is_logged_and_the_worker_serves(real: ComfyTarget, tmp_path: Path) -> None:
    # A models folder of its own without weights (the session's ComfyUI has the typed stand-ins).
    api = start_runpod_api(worker_env(real, tmp_path / "work", DIFFBOX_WARMUP="qwen_edit:fast:2509",
                                      DIFFBOX_MODELS_DIR=str(tmp_path / "no-weights")),
                           tmp_path / "handler.log")
    try:
        body = api.runsync(invert_job(IMAGE))
    finally:
        api.stop()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["timings"]["warmup_s"] > 0
    warm = [json.loads(line) for line in api.logs().splitlines() if '"warm-up' in line]
    assert [(e["msg"], e["spec"], e["error_type"]) for e in warm] == [
        ("warm-up failed", "qwen_edit:fast:2509", "backend")]
    assert warm[0]["error"].startswith("model files for qwen_edit:2509:fast missing"), warm


async def test_animated_webp_from_a_raw_graph(real: ComfyTarget, tmp_path: Path) -> None:
    # No node of ComfyUI 0.3.64 or KJNodes writes a GIF (VideoHelperSuite's VHS_VideoCombine does,
    # and it is not installed): the animation a core graph makes is an animated WEBP or PNG.
    # Frames alternate (an encoder merges identical neighbours): input, inverted, input, ...
    graph = {**INVERT_GRAPH,
             "8": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
             "4": {"class_type": "RepeatImageBatch", "inputs": {"image": ["8", 0], "amount": 3}},
             "5": {"class_type": "SaveAnimatedWEBP", "inputs": {
                 "images": ["4", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": True, "quality": 80,
                 "method": "default"}}}
    result = await Service(attached(real, tmp_path)).run("anim", invert_job(IMAGE) | {"workflow": graph})
    assert "error" not in result, result
    [webp] = [i for i in result["images"] if i["filename"].endswith(".webp")]
    assert webp["content_type"] == "image/webp"
    with Image.open(io.BytesIO(base64.b64decode(webp["data"]))) as decoded:
        assert decoded.n_frames == 6 and decoded.size == (40, 32)
