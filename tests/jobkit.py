"""Jobs for in-process `Service` tests, and the checks that a job left nothing behind.

A job that ends, however it ends, must leave no file in ComfyUI's folders or the worker's,
no prompt in ComfyUI's queue, no thread still running diffbox code and no child process.
"""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import requests
from PIL import Image, ImageChops, ImageOps

from diffbox.config import Settings
from tests.conftest import ComfyTarget
from tests.fakes.comfyui.faults import set_config

DIFFBOX_DIR = str(Path(__file__).resolve().parent.parent / "diffbox")

# LoadImage -> ImageInvert -> SaveImage: the output proves which input it came from.
INVERT_GRAPH: dict[str, Any] = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
}


def sampler_graph(steps: int) -> dict[str, Any]:
    """A KSampler of `steps` steps (the fake runs it without weights; see sampling_fake)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": -1, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sampled"}},
    }


@contextlib.contextmanager
def sampling_fake(fake: ComfyTarget, step_delay_s: float) -> Iterator[ComfyTarget]:
    """The fake with the checkpoint sampler_graph loads, taking `step_delay_s` per step."""
    assert fake.base_dir is not None
    checkpoints = fake.base_dir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "tiny.safetensors").write_bytes(b"")
    set_config(fake.url, step_delay_s=step_delay_s)
    try:
        yield fake
    finally:
        set_config(fake.url, step_delay_s=0.01)


@contextlib.contextmanager
def sampling(comfy: ComfyTarget, step_delay_s: float) -> Iterator[ComfyTarget]:
    """A ComfyUI that runs sampler_graph: the fake at `step_delay_s` a step, or a real one as it
    is (tests/comfyui_env's tiny checkpoint, about 0.07 s a step on a CPU)."""
    if not comfy.is_fake:
        yield comfy
        return
    with sampling_fake(comfy, step_delay_s) as fake:
        yield fake


def settings(comfy: ComfyTarget, tmp_path: Path, **overrides: Any) -> Settings:
    """A worker attached to `comfy` (sharing its disk), working in `tmp_path`."""
    assert comfy.base_dir is not None
    values: dict[str, Any] = {
        "comfyui_url": comfy.url, "comfyui_dir": comfy.base_dir, "work_dir": tmp_path / "work",
        "startup_timeout_s": 30, **overrides,
    }
    return Settings(**values)


def png_b64(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def invert_job(image: str) -> dict[str, Any]:
    return {"workflow": INVERT_GRAPH, "images": [{"name": "input.png", "image": image}]}


def decoded(image_b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")


def max_difference(a: Image.Image, b: Image.Image) -> int:
    """The largest channel difference between two images (255 when the sizes differ). Real
    ComfyUI nodes work in float and round, so outputs are off by a level here and there:
    callers allow 1 where an exact result is known."""
    if a.size != b.size:
        return 255
    extrema = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema()
    return max(high for _, high in extrema)


def inversion_error(output: Image.Image, original: Image.Image) -> int:
    """How far `output` is from the exact inversion of `original` (see max_difference)."""
    return max_difference(output, ImageOps.invert(original.convert("RGB")))


def is_inversion_of(output_b64: str, input_b64: str) -> bool:
    return inversion_error(decoded(output_b64), decoded(input_b64)) <= 1


def queue_ids(url: str) -> tuple[list[str], list[str]]:
    """ComfyUI's prompt ids: (running, pending)."""
    body = requests.get(f"{url}/queue", timeout=5).json()
    return [item[1] for item in body["queue_running"]], [item[1] for item in body["queue_pending"]]


def job_files(comfy: ComfyTarget, job_id: str) -> list[Path]:
    assert comfy.base_dir is not None
    return [p for folder in ("input", "output", "temp")
            for p in (comfy.base_dir / folder / "diffbox").glob(f"{job_id}-*")]


def held_inputs(comfy: ComfyTarget) -> list[Path]:
    """Input files in the workers' folders (named by their content, not by job)."""
    assert comfy.base_dir is not None
    return [p for p in (comfy.base_dir / "input" / "diffbox").glob("in-*/*") if p.is_file()]


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def _runs_diffbox_code(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(DIFFBOX_DIR):
            return True
        frame = frame.f_back
    return False


@dataclass
class Baseline:
    """Threads and child processes before a job, to compare with after it."""

    threads: set[threading.Thread]
    children: set[int]
    started: float  # time.time(): input files written since are the jobs' of this test

    @classmethod
    def take(cls) -> Baseline:
        return cls(set(threading.enumerate()), {p.pid for p in psutil.Process().children(recursive=True)},
                   time.time() - 1)  # a file system's timestamps may lag the clock by a tick

    def leaked_threads(self) -> list[str]:
        # New threads, and any thread (the event loop's reusable pool included) still in diffbox code.
        # A test's fault proxy (tests/faultproxy.py) starts threads per connection: not the worker's.
        return [t.name for t in threading.enumerate()
                if t.is_alive() and t is not threading.current_thread()
                and ((t not in self.threads and not t.name.startswith(("asyncio_", "faultproxy")))
                     or _runs_diffbox_code(t))]

    def new_children(self) -> list[str]:
        return [f"{p.pid} {p.name()}" for p in psutil.Process().children(recursive=True)
                if p.pid not in self.children and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def wait_ended(self, children_s: float = 20, threads_s: float = 10) -> None:
        """Every child process and thread started since the baseline has ended."""
        wait_until(lambda: not self.new_children(), children_s, f"child processes ended: {self.new_children()}")
        wait_until(lambda: not self.leaked_threads(), threads_s, f"threads ended: {self.leaked_threads()}")

    def assert_nothing_left(self, comfy: ComfyTarget, work_dir: Path, *job_ids: str, settle_s: float = 10) -> None:
        self.wait_ended(settle_s, settle_s)
        for job_id in job_ids:
            assert job_files(comfy, job_id) == [], job_id
            assert not (work_dir / job_id).exists(), job_id
        assert [p for p in held_inputs(comfy) if p.stat().st_mtime >= self.started] == []
        running, pending = queue_ids(comfy.url)
        assert running == [] and pending == []
