"""The typed workflows run to their last node on a real ComfyUI (the real leg only).

Every file their presets name is a random-weight stand-in (tests/comfyui_env/
make_typed_models.py): the text encoders and VAE at full size, the diffusion models tiny. The
jobs go through the worker as RunPod runs it (`python handler.py` in the runpod SDK's
production loop against tests/fakes/runpod_api.py), with outputs inline or in S3 (moto), and
what comes back is checked independently of the worker: decoded with PyAV and Pillow.

The sizes are the schema's smallest (256x256, 5 or 9 frames), and jobs share prompts, so that
ComfyUI encodes each prompt once (it reuses a node's output while its inputs repeat): on two
cores an umt5 encode takes about a minute and a Wan VAE decode of 5 frames about as long.
The Wan jobs run before the Qwen ones, and ComfyUI's models are freed between the two, so
the two text encoders are never in memory together.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest
import requests
from PIL import Image, ImageChops, ImageStat

from diffbox.config import Settings
from diffbox.service import Service
from diffbox.workflows import manifest
from tests.conftest import ComfyTarget, production_worker, worker_env
from tests.fakes.hf_hub import FakeHub, serve_fake_hub
from tests.fakes.runpod_api import FakeRunpodApi
from tests.lorafiles import lora_bytes
from tests.s3 import S3Server

# Generous: a Qwen edit alone encodes its reference images at about 1 MP on two cores.
pytestmark = pytest.mark.timeout(2400)

PROMPT = "a fox runs"
WAN = {"workflow": "i2v", "prompt": PROMPT, "frames": 5, "width": 256, "height": 256, "seed": 11}
SVI = {"workflow": "svi", "prompts": [PROMPT, PROMPT], "frames_per_clip": 9, "width": 256, "height": 256,
       "seed": 11}
QWEN = {"workflow": "qwen_edit", "prompt": "make it blue", "model": "2509", "width": 256, "height": 256, "seed": 11}
# Layers of the stand-in models that a request's LoRA can name (make_typed_models.py's shapes).
WAN_LAYER = ("diffusion_model.blocks.0.self_attn.q", 128)
# The attention's output layer: a change there reaches the image (one in to_q barely moves
# near-uniform random attention, and the patched weight is rounded back to fp8).
QWEN_LAYER = ("transformer_blocks.0.attn.to_out.0", 3072)
SD15_LAYER = ("diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q", 320)  # of no Wan layer


def picture(seed: int, size: tuple[int, int] = (320, 256)) -> str:
    """A PNG with structure (bands of colour), base64."""
    image = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), ((x * 7 + seed * 40) % 256, (y * 5) % 256, ((x + y) * 3 + seed * 90) % 256))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def frames_of(data: bytes) -> tuple[list[Image.Image], float, float]:
    """The decoded frames, the stream's frame rate and duration in seconds."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        rate = float(stream.average_rate or 0)
        duration = float(container.duration or 0) / av.time_base
    return frames, rate, duration


def varied(image: Image.Image) -> bool:
    """Not one flat colour: something was drawn."""
    return max(ImageStat.Stat(image).stddev) > 2.0


def differs(a: Image.Image, b: Image.Image) -> bool:
    return max(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) > 0.5


def free_comfyui(comfy: ComfyTarget) -> None:
    """Unload ComfyUI's models and drop its cached node outputs (which hold the text encoder)."""
    requests.post(f"{comfy.url}/free", json={"unload_models": True, "free_memory": True}, timeout=30)


@pytest.fixture(scope="module")
def typed_comfy(real_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    info = requests.get(f"{real_comfyui.url}/object_info/CLIPLoader", timeout=30).json()
    if "umt5_xxl_fp8_e4m3fn_scaled.safetensors" not in info["CLIPLoader"]["input"]["required"]["clip_name"][0]:
        pytest.fail("the real ComfyUI has no stand-ins for the typed workflows' weights: run `make comfyui-env`",
                    pytrace=False)
    free_comfyui(real_comfyui)
    yield real_comfyui
    free_comfyui(real_comfyui)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as served:
        served.add("diffbox/loras", "wan-high.safetensors", lora_bytes(1, WAN_LAYER[0], 4, WAN_LAYER[1], 0.5))
        served.add("diffbox/loras", "wan-low.safetensors", lora_bytes(2, WAN_LAYER[0], 4, WAN_LAYER[1], 0.5))
        served.add("diffbox/loras", "sd15.safetensors", lora_bytes(3, SD15_LAYER[0], 4, SD15_LAYER[1], 0.5))
        served.add("diffbox/loras", "qwen.safetensors", lora_bytes(4, QWEN_LAYER[0], 4, QWEN_LAYER[1], 0.2))
        yield served


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("typed-real") / "worker.log"


@pytest.fixture(scope="module")
def worker(typed_comfy: ComfyTarget, runpod_api: FakeRunpodApi, s3_server: S3Server, bucket: str, hub: FakeHub,
           worker_log: Path) -> Iterator[subprocess.Popen[bytes]]:
    # DEBUG: the prompts' node times, which say in which order ComfyUI loaded the weights.
    env = worker_env(typed_comfy, worker_log.parent / "work", **runpod_api.env(), **s3_server.env(bucket),
                     HF_ENDPOINT=hub.url, DIFFBOX_ALLOW_PRIVATE_URLS="1", DIFFBOX_JOB_TIMEOUT_S="1800",
                     DIFFBOX_LOG_LEVEL="DEBUG")
    with production_worker(env, worker_log) as proc:
        yield proc


class Jobs:
    """Jobs through the production loop; each result kept, as later tests compare with earlier."""

    def __init__(self, api: FakeRunpodApi, s3: S3Server, log: Path) -> None:
        self.api = api
        self.s3 = s3
        self.log = log
        self.results: dict[str, dict[str, Any]] = {}

    def log_size(self) -> int:
        return self.log.stat().st_size

    def loaded(self, since: int) -> list[str]:
        """The weight files ComfyUI's loaders read, in order, in the prompts logged after `since`."""
        with self.log.open("rb") as f:
            f.seek(since)
            events = [json.loads(line) for line in f.read().decode().splitlines() if line.startswith("{")]
        return [node["file"] for e in events if e["msg"] == "prompt node times" for node in e["nodes"]
                if "file" in node]

    def run(self, job_id: str, job_input: dict[str, Any], timeout_s: float = 2300) -> dict[str, Any]:
        self.api.add_job(job_id, job_input)
        deadline = time.monotonic() + timeout_s
        while (final := self.api.final(job_id)) is None:
            assert time.monotonic() < deadline, f"{job_id}: no result in {timeout_s:.0f} s"
            time.sleep(0.5)
        assert "output" in final and "error" not in final["output"], final
        output: dict[str, Any] = final["output"]
        self.results[job_id] = output
        return output

    def updates(self, job_id: str) -> list[dict[str, Any]]:
        posts = [p["output"] for p in self.api.posts_for(job_id) if p.get("status") == "IN_PROGRESS"]
        return sorted(posts, key=lambda u: u["seq"])

    def data(self, output: dict[str, Any]) -> bytes:
        if "data" in output:
            return base64.b64decode(output["data"])
        bucket, key = output["s3_uri"].removeprefix("s3://").split("/", 1)
        body: bytes = self.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def video(self, job_id: str, index: int = 0) -> tuple[list[Image.Image], float, float]:
        return frames_of(self.data(self.results[job_id]["outputs"][index]))

    def image(self, job_id: str) -> Image.Image:
        [output] = self.results[job_id]["outputs"]
        image = Image.open(io.BytesIO(self.data(output)))
        image.load()
        return image


@pytest.fixture(scope="module")
def jobs(worker: subprocess.Popen[bytes], runpod_api: FakeRunpodApi, s3_server: S3Server, worker_log: Path) -> Jobs:
    return Jobs(runpod_api, s3_server, worker_log)


def sampler_progress(updates: list[dict[str, Any]], node: str) -> list[tuple[int, int]]:
    return [(u["step"], u["steps"]) for u in updates if u.get("node") == node and "step" in u]


# ---- Wan 2.2 I2V ---------------------------------------------------------------------------


def test_i2v_fast_inline(jobs: Jobs) -> None:
    mark = jobs.log_size()
    result = jobs.run("i2v-fast", {**WAN, "image": picture(1), "output": {"store": "inline"}})
    # The first job on a freed ComfyUI loads every file, in the order the prefetch reads them.
    assert jobs.loaded(mark) == [f.name for f in manifest.load().required("i2v", "fast")]
    assert (result["preset"], result["steps"], result["switch_step"]) == ("fast", 4, 2)
    frames, rate, duration = jobs.video("i2v-fast")
    assert [f.size for f in frames] == [(256, 256)] * 5
    assert rate == 16 and duration == pytest.approx(5 / 16, abs=0.07)
    assert all(varied(f) for f in frames)
    output = result["outputs"][0]
    assert (output["width"], output["height"], output["frames"], output["fps"]) == (256, 256, 5, 16)
    # Each expert's sampler reports its own steps: 2 of the 4 (the switch is at 2).
    progress = sampler_progress(jobs.updates("i2v-fast"), "KSamplerAdvanced")
    assert progress and all(steps == 2 and 1 <= step <= 2 for step, steps in progress), progress


def test_i2v_quality_first_last_frame_to_s3(jobs: Jobs) -> None:
    result = jobs.run("i2v-flf", {**WAN, "image": picture(1), "end_image": picture(2), "preset": "quality",
                                  "steps": 4})
    assert (result["preset"], result["cfg"], result["shift"]) == ("quality", 4.0, 8.0)
    [output] = result["outputs"]
    assert "url" in output and output["s3_uri"].startswith("s3://")
    frames, rate, _ = jobs.video("i2v-flf")
    assert [f.size for f in frames] == [(256, 256)] * 5 and rate == 16
    assert all(varied(f) for f in frames)
    assert any(differs(a, b) for a, b in zip(frames, jobs.video("i2v-fast")[0], strict=True))


# ---- LoRAs on Wan: each target, and one that fits no layer --------------------------------------


def test_i2v_request_loras_change_the_pixels_and_a_foreign_one_is_named(jobs: Jobs, typed_comfy: ComfyTarget) -> None:
    base, _, _ = jobs.video("i2v-fast")
    job = {**WAN, "image": picture(1), "output": {"store": "inline"}}
    high = jobs.run("lora-high", {**job, "loras": [
        {"source": "hf://diffbox/loras/wan-high.safetensors", "target": "high"},
        {"source": "hf://diffbox/loras/sd15.safetensors", "target": "low"}]})
    # The SD1.5 LoRA matches no Wan layer: ComfyUI ignores it, and the caller is told which.
    [warning] = high["warnings"]
    assert warning.startswith("loras[1] (hf://diffbox/loras/sd15.safetensors): ComfyUI found no layer of the model "
                              "for any of its 3 tensors"), warning
    low = jobs.run("lora-low", {**job, "loras": [{"source": "hf://diffbox/loras/wan-low.safetensors",
                                                  "target": "low"}]})
    both = jobs.run("lora-both", {**job, "loras": [{"source": "hf://diffbox/loras/wan-high.safetensors",
                                                    "target": "both"}]})
    assert "warnings" not in low and "warnings" not in both
    videos = {name: jobs.video(name)[0] for name in ("lora-high", "lora-low", "lora-both")}
    for name, frames in videos.items():
        assert len(frames) == 5 and all(varied(f) for f in frames), name
        assert any(differs(a, b) for a, b in zip(frames, base, strict=True)), f"{name}: same pixels as without it"
    assert any(differs(a, b) for a, b in zip(videos["lora-high"], videos["lora-both"], strict=True))
    log = requests.get(f"{typed_comfy.url}/internal/logs", timeout=10).json()
    assert f"lora key not loaded: {WAN_LAYER[0]}" not in log
    assert f"lora key not loaded: {SD15_LAYER[0]}.lora_up.weight" in log  # the check above can fail


# ---- SVI: clips chained, joined with the overlap, and a cancel that keeps what is done ----------


def test_svi_two_clips_joined(jobs: Jobs) -> None:
    result = jobs.run("svi-2", {**SVI, "image": picture(3), "output": {"store": "inline"}})
    assert (result["clips"], result["overlap_frames"], result["frames"]) == (2, 5, 13)
    partials = sorted((i for i, o in enumerate(result["outputs"]) if "clip" in o),
                      key=lambda i: result["outputs"][i]["clip"])
    [joined] = [i for i, o in enumerate(result["outputs"]) if "clip" not in o]
    clips = [jobs.video("svi-2", i)[0] for i in partials]
    assert [len(c) for c in clips] == [9, 9]
    frames, rate, duration = jobs.video("svi-2", joined)
    # Kijai's chaining: the second clip's first 5 frames cross-fade into the first clip's last 5.
    assert len(frames) == 13 and rate == 16 and duration == pytest.approx(13 / 16, abs=0.07)
    assert all(f.size == (256, 256) and varied(f) for f in frames)
    assert not differs(frames[0], clips[0][0]) and not differs(frames[-1], clips[1][-1])
    updates = jobs.updates("svi-2")
    assert {u["clip"] for u in updates if "clip" in u} == {1, 2} and {u["clips"] for u in updates if "clip" in u} == {2}
    assert sampler_progress(updates, "KSamplerAdvanced")


async def test_svi_cancelled_in_clip_2_keeps_clip_1(typed_comfy: ComfyTarget, tmp_path: Path) -> None:
    """In-process: RunPod's production loop posts nothing for a cancelled job, so the partial
    clips are seen through the worker's own cancel (the same stop the platforms use)."""
    assert typed_comfy.base_dir is not None
    service = Service(Settings(comfyui_url=typed_comfy.url, comfyui_dir=typed_comfy.base_dir,
                               models_dir=typed_comfy.base_dir / "models", work_dir=tmp_path / "work",
                               startup_timeout_s=30, job_timeout_s=1800))
    stop = threading.Event()
    updates: list[dict[str, Any]] = []

    def on_update(update: dict[str, Any]) -> None:
        updates.append(update)
        if update.get("clip") == 2:
            stop.set()

    # Clip 1 as in the test above (ComfyUI reuses it); clip 2's new prompt takes a while to encode.
    result = await service.run("svi-cancel", {**SVI, "image": picture(3), "prompts": [PROMPT, "a fox sits"]},
                               on_update, stop)
    error = result["error"]
    assert error["type"] == "cancelled", error
    [kept] = error["details"]["outputs"]
    assert kept["clip"] == 1 and kept["frames"] == 9
    frames, _, _ = frames_of(base64.b64decode(kept["data"]))
    assert len(frames) == 9 and all(varied(f) for f in frames)
    # The prompt has left ComfyUI: nothing of the cancelled job runs on.
    queue = await asyncio.to_thread(lambda: requests.get(f"{typed_comfy.url}/queue", timeout=10).json())
    assert queue == {"queue_running": [], "queue_pending": []}


# ---- Qwen Image Edit 2509 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_jobs(jobs: Jobs, typed_comfy: ComfyTarget) -> Jobs:
    free_comfyui(typed_comfy)  # umt5 out of memory before Qwen's encoder comes in
    return jobs


def test_qwen_edit_one_image_inline(qwen_jobs: Jobs) -> None:
    mark = qwen_jobs.log_size()
    result = qwen_jobs.run("qwen-1", {**QWEN, "images": [picture(4, (256, 256))], "output": {"store": "inline"}})
    assert qwen_jobs.loaded(mark) == [f.name for f in manifest.load().required("qwen_edit:2509", "fast")]
    assert (result["model"], result["steps"], result["width"], result["height"]) == ("2509", 4, 256, 256)
    image = qwen_jobs.image("qwen-1")
    assert image.size == (256, 256) and image.format == "PNG" and varied(image)
    progress = sampler_progress(qwen_jobs.updates("qwen-1"), "KSampler")
    assert progress and all(steps == 4 for _, steps in progress), progress


# Two reference images make ComfyUI's sampler attend over about 8,200 tokens (each image is
# VAE-encoded at about 1 MP, whatever the output size) beside the 9 GB text encoder: its process
# was at 17.4 GB of anonymous memory when the kernel killed it here (24 GB, shared with other jobs).
@pytest.mark.skipif(not os.environ.get("DIFFBOX_TEST_QWEN_TWO_IMAGES"),
                    reason="a two-image Qwen edit needs more memory than CI's 24 GB machine spares "
                           "(set DIFFBOX_TEST_QWEN_TWO_IMAGES=1 on a larger one)")
def test_qwen_edit_two_images_to_s3(qwen_jobs: Jobs) -> None:
    result = qwen_jobs.run("qwen-2", {**QWEN, "images": [picture(4, (256, 256)), picture(5, (200, 300))]})
    assert "url" in result["outputs"][0]
    image = qwen_jobs.image("qwen-2")
    assert image.size == (256, 256) and varied(image)
    assert differs(image, qwen_jobs.image("qwen-1"))  # the second image conditions the edit


def test_qwen_edit_request_lora_changes_the_pixels(qwen_jobs: Jobs) -> None:
    result = qwen_jobs.run("qwen-lora", {**QWEN, "images": [picture(4, (256, 256))], "output": {"store": "inline"},
                                         "loras": [{"source": "hf://diffbox/loras/qwen.safetensors"}]})
    assert "warnings" not in result
    assert differs(qwen_jobs.image("qwen-lora"), qwen_jobs.image("qwen-1"))
