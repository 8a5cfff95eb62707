"""The typed workflows end to end against the fake ComfyUI (stand-in samplers, real video
files): through the RunPod SDK's `/runsync`, with a warm-up at start, and in-process for
what its local API cannot do (cancelling mid-job)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest
import requests
from PIL import Image

from diffbox import model_lock
from diffbox.config import Settings
from diffbox.service import Service
from diffbox.workflows import manifest
from tests.conftest import ComfyTarget, RunpodApi, start_runpod_api, worker_env
from tests.fakes.comfyui.faults import set_config


def png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def video_frames(data: str) -> tuple[int, int, int]:
    with av.open(io.BytesIO(base64.b64decode(data))) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height, sum(1 for _ in container.decode(stream))


@pytest.fixture(scope="module")
def comfy(fake_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    """The fake with a placeholder file for every weight the manifest names, and quick steps."""
    assert fake_comfyui.base_dir is not None
    for f in manifest.load().files.values():
        path = f.local_path(fake_comfyui.base_dir / "models")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    set_config(fake_comfyui.url, step_delay_s=0.002)
    yield fake_comfyui
    set_config(fake_comfyui.url, step_delay_s=0.01)


@pytest.fixture(scope="module")
def api(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    tmp = tmp_path_factory.mktemp("workflows")
    env = worker_env(comfy, tmp / "work", DIFFBOX_WARMUP="i2v:fast")
    api = start_runpod_api(env, tmp / "handler.log")
    yield api
    api.stop()


def runsync(api: RunpodApi, job_input: dict[str, Any]) -> dict[str, Any]:
    response = api.runsync(job_input)
    assert response["status"] == "COMPLETED", response
    output: dict[str, Any] = response["output"]
    return output


def test_i2v_after_warm_up(api: RunpodApi) -> None:
    job = {"workflow": "i2v", "image": png(416, 240), "prompt": "a fox runs", "frames": 17, "seed": 11}
    first = runsync(api, job)
    assert "error" not in first, first
    assert first["timings"]["warmup_s"] > 0  # the warm-up ran before the worker took this job
    assert '"warm-up done"' in api.logs() and '"spec": "i2v:fast"' in api.logs()
    # The warm-up's weights were read into memory from the worker's start (prefetch.py).
    [started] = [json.loads(line) for line in api.logs().splitlines() if '"prefetch started"' in line]
    [ended] = [json.loads(line) for line in api.logs().splitlines() if '"prefetch ended"' in line]
    assert started["files"] == len(manifest.load().required("i2v", "fast")) and ended["ended"] == "done"
    assert {k: first[k] for k in ("workflow", "seed", "preset", "steps", "switch_step", "cfg", "width",
                                  "height", "frames", "fps")} == {
        "workflow": "i2v", "seed": 11, "preset": "fast", "steps": 4, "switch_step": 2, "cfg": 1.0,
        "width": 832, "height": 480, "frames": 17, "fps": 16}  # the input's aspect at about 0.4 MP
    [video] = first["outputs"]
    assert (video["kind"], video["content_type"]) == ("video", "video/mp4")
    assert video_frames(video["data"]) == (832, 480, 17)
    assert (video["width"], video["height"], video["frames"]) == (832, 480, 17)

    second = runsync(api, {**job, "preset": "quality", "end_image": png(64, 64), "width": 256, "height": 256})
    assert "warmup_s" not in second["timings"]
    assert (second["steps"], second["cfg"], second["shift"]) == (20, 4.0, 8.0)  # the flf2v template's quality
    assert video_frames(second["outputs"][0]["data"]) == (256, 256, 17)


@pytest.mark.parametrize("model", ["2511", "2509"])
def test_qwen_edit_returns_a_png_of_the_asked_size(api: RunpodApi, model: str) -> None:
    result = runsync(api, {"workflow": "qwen_edit", "images": [png(300, 200), png(50, 50)], "prompt": "make it blue",
                           "model": model, "width": 512, "height": 384})
    assert (result["model"], result["steps"], result["width"], result["height"]) == (model, 4, 512, 384)
    [image] = result["outputs"]
    assert (image["kind"], image["content_type"], image["width"], image["height"]) == ("image", "image/png", 512, 384)
    with Image.open(io.BytesIO(base64.b64decode(image["data"]))) as decoded:
        assert decoded.size == (512, 384)


def test_svi_returns_the_joined_video_and_every_clip(api: RunpodApi) -> None:
    result = runsync(api, {"workflow": "svi", "image": png(256, 256), "prompts": ["walks", "turns", "sits"],
                           "frames_per_clip": 17, "seed": 5, "width": 256, "height": 256})
    assert (result["seeds"], result["clips"], result["overlap_frames"], result["frames"]) == ([5, 6, 7], 3, 5, 41)
    partials = sorted((o for o in result["outputs"] if "clip" in o), key=lambda o: o["clip"])
    [joined] = [o for o in result["outputs"] if "clip" not in o]
    assert [o["clip"] for o in partials] == [1, 2, 3]
    assert all(video_frames(o["data"]) == (256, 256, 17) for o in partials)
    assert video_frames(joined["data"]) == (256, 256, 41)


# In-process: the SDK's local API has no /cancel (and answers an error result with HTTP 500),
# and an empty models folder is per worker. The requests refused before queuing run on both
# ComfyUIs (`comfyui`); the rest needs the fake's stand-in model nodes (`comfy`).


def _service(comfy: ComfyTarget, tmp_path: Path, **overrides: Any) -> Service:
    assert comfy.base_dir is not None
    values: dict[str, Any] = {"comfyui_url": comfy.url, "comfyui_dir": comfy.base_dir, "work_dir": tmp_path / "work",
                              "models_dir": comfy.base_dir / "models", "startup_timeout_s": 30, **overrides}
    return Service(Settings(**values))


def _history_size(comfy: ComfyTarget) -> int:
    return len(requests.get(f"{comfy.url}/history", timeout=5).json())


async def test_bad_request_is_refused_before_queuing(comfyui: ComfyTarget, tmp_path: Path) -> None:
    before = _history_size(comfyui)
    result = await _service(comfyui, tmp_path).run("bad", {"workflow": "i2v", "image": png(64, 64), "prompt": "x",
                                                         "frames": 80})
    assert result["error"] == {"type": "validation", "message": "frames: must be 4n+1 between 5 and 161, got 80",
                               "details": [{"field": "frames", "message": "must be 4n+1 between 5 and 161, got 80"}]}
    assert _history_size(comfyui) <= before  # (an earlier job's entry may go meanwhile)


async def test_endpoint_serves_only_its_workflows(comfyui: ComfyTarget, tmp_path: Path) -> None:
    service = _service(comfyui, tmp_path, workflows=["qwen_edit"])
    result = await service.run("not-here", {"workflow": "i2v", "image": png(64, 64), "prompt": "x"})
    assert result["error"]["message"] == "workflow: 'i2v' is not served by this endpoint"


async def test_missing_weights_fail_before_queuing(comfyui: ComfyTarget, tmp_path: Path) -> None:
    service = _service(comfyui, tmp_path, models_dir=tmp_path / "empty")
    before = _history_size(comfyui)
    result = await service.run("no-weights", {"workflow": "svi", "image": png(64, 64), "prompt": "x",
                                              "preset": "quality"})
    error = result["error"]
    assert error["type"] == "backend"
    assert error["message"].startswith("model files for svi:quality missing or not as weights.lock.json records")
    assert {(m["folder"], m["file"], m["problem"]) for m in error["details"]["files"]} == {
        (f.folder, f.name, "missing") for f in manifest.load().required("svi", "quality")}
    assert _history_size(comfyui) <= before  # nothing reached ComfyUI (an earlier job's entry may go meanwhile)


async def test_a_volume_whose_files_differ_from_its_lock_names_them_and_the_fetch_command(
        comfy: ComfyTarget, tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume" / "models"
    required = manifest.load().required("i2v", "fast")
    locked = {}
    for f in required:
        f.local_path(volume).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(volume).write_bytes(b"w" * 8)
        locked[f.key] = model_lock.LockedFile(repo=f.repo, path=f.path, folder=f.folder, revision=f.revision,
                                              commit="c" * 40, size=8, sha256="0" * 64, fetched_at=model_lock.now())
    short, gone = required[0], required[-1]
    short.local_path(volume).write_bytes(b"w" * 3)  # a copy cut short
    gone.local_path(volume).unlink()
    model_lock.write(volume / model_lock.LOCK_NAME, model_lock.WeightsLock(files=locked))
    service = _service(comfy, tmp_path, models_dir=volume)
    before = _history_size(comfy)
    result = await service.run("volume", {"workflow": "i2v", "image": png(64, 64), "prompt": "x"})
    error = result["error"]
    assert error["type"] == "backend"
    assert f"{short.folder}/{short.name} (3 bytes, the lock says 8)" in error["message"]
    assert f"{gone.folder}/{gone.name} (missing)" in error["message"]
    assert error["message"].endswith(
        f"Fetch them with: python -m builder download --workflows i2v --presets fast --dest {volume}")
    assert [m["file"] for m in error["details"]["files"]] == [short.name, gone.name]
    assert _history_size(comfy) <= before  # (an earlier job's entry may go meanwhile)


async def test_svi_cancelled_after_clip_2_keeps_clips_1_and_2(comfy: ComfyTarget, tmp_path: Path) -> None:
    assert comfy.base_dir is not None
    service = _service(comfy, tmp_path)
    stop = threading.Event()
    outputs = comfy.base_dir / "output" / "diffbox"
    updates: list[dict[str, Any]] = []

    def cancel_when_clip_2_is_saved() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(outputs.glob("cancel-svi*/svi_clip02_*.mp4")):
            time.sleep(0.005)
        stop.set()

    # Slow enough that clip 3 is still sampling when the cancel lands, even on a loaded machine.
    set_config(comfy.url, step_delay_s=0.08)
    watcher = threading.Thread(target=cancel_when_clip_2_is_saved, daemon=True)
    watcher.start()
    try:
        result = await service.run("cancel-svi", {
            "workflow": "svi", "image": png(128, 128), "prompts": ["a", "b", "c"], "frames_per_clip": 9,
            "steps": 20, "width": 256, "height": 256}, updates.append, stop)
    finally:
        set_config(comfy.url, step_delay_s=0.002)
        await asyncio.to_thread(watcher.join, 5)
    error = result["error"]
    assert error["type"] == "cancelled", error
    kept = error["details"]["outputs"]
    assert sorted(o["clip"] for o in kept) == [1, 2]
    assert all(o["kind"] == "video" and o["frames"] == 9 for o in kept)
    assert {u["clips"] for u in updates if "clip" in u} <= {3}
