"""A LoRA fetched through the worker's cache is one ComfyUI finds by the name the graph gives
it (`diffbox-cache/<sha256>.safetensors` under the models folder's `loras`), and, on the real
leg with its tiny random-weight checkpoint, one ComfyUI really loads and applies. The first
test runs on the fake too (its validation lists model folders as ComfyUI does)."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image, ImageChops

from diffbox.config import Settings
from diffbox.inputs.urls import UrlPolicy
from diffbox.loras.fetch import JobLoras, LoraFetcher, fetcher_for
from diffbox.loras.request import LoraEntry
from diffbox.service import Service
from tests.conftest import ComfyTarget
from tests.fakes.hf_hub import serve_fake_hub
from tests.jobkit import sampler_graph, settings
from tests.lorafiles import lora_bytes

TINY_CHECKPOINT = "tiny.safetensors"  # tests/comfyui_env's random-weight SD1.5
# A layer of that checkpoint's UNet (320 channels), as ComfyUI's LoRA key map names it.
TINY_LAYER = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0"


def fetch_through_cache(comfy: ComfyTarget, data: bytes) -> tuple[LoraFetcher, JobLoras]:
    """`data` served by a loopback Hub and fetched by the worker's own LoRA path into the cache
    on ComfyUI's disk; the caller releases the job's pin."""
    assert comfy.base_dir is not None, "needs DIFFBOX_TEST_COMFYUI_DIR: the cache is on ComfyUI's disk"
    with serve_fake_hub() as hub:
        hub.add("someone/tiny", "tiny.safetensors", data)
        settings = Settings(models_dir=comfy.base_dir / "models", hf_endpoint=hub.url, comfyui_url=comfy.url)
        fetcher = fetcher_for(settings, UrlPolicy(), None)
        job = fetcher.fetch([LoraEntry(source="hf://someone/tiny/tiny.safetensors")], lambda done, total: None,
                            lambda: False, lambda: 60.0)
    return fetcher, job


def test_comfyui_validates_a_graph_naming_a_cached_lora(comfyui: ComfyTarget, tmp_path: Path) -> None:
    data = lora_bytes(uuid.uuid4().int % 1000)
    fetcher, job = fetch_through_cache(comfyui, data)
    sha = job.files[0].sha256
    try:
        [fetched] = job.files
        assert not fetched.cache_hit
        assert fetched.comfy_name in requests.get(f"{comfyui.url}/models/loras", timeout=10).json()
        # No model here to apply it to: the UNet's file is missing on purpose, and ComfyUI's
        # validation must find fault with that node only, not with the LoRA's name.
        graph: dict[str, Any] = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "absent.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": fetched.comfy_name, "strength_model": 0.5}},
            "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "diffbox/never"}},
        }
        response = requests.post(f"{comfyui.url}/prompt", json={"prompt": graph}, timeout=30)
        assert response.status_code == 400, response.text
        errors = response.json()["node_errors"]
        assert "1" in errors and "2" not in errors, errors
        wrong = {**graph, "2": {**graph["2"],
                                "inputs": {**graph["2"]["inputs"], "lora_name": "diffbox-cache/x.safetensors"}}}
        errors = requests.post(f"{comfyui.url}/prompt", json={"prompt": wrong}, timeout=30).json()["node_errors"]
        assert "2" in errors  # the check above can fail
    finally:
        job.release()
        fetcher.cache.path(sha).unlink()


async def test_comfyui_applies_a_lora_from_the_cache(comfyui: ComfyTarget, tmp_path: Path) -> None:
    if comfyui.is_fake:
        pytest.skip("needs a real ComfyUI to load the LoRA into a model")
    info = requests.get(f"{comfyui.url}/object_info/CheckpointLoaderSimple", timeout=10).json()
    if TINY_CHECKPOINT not in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]:
        pytest.skip(f"this ComfyUI has no checkpoints/{TINY_CHECKPOINT} (tests/comfyui_env)")
    fetcher, job = fetch_through_cache(comfyui, lora_bytes(uuid.uuid4().int % 1000, TINY_LAYER, rank=4,
                                                           features=320, scale=2.0))
    try:
        plain = sampler_graph(2)
        plain["5"]["inputs"]["seed"] = 7
        with_lora = {**plain, "8": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": job.files[0].comfy_name, "strength_model": 1.0}}}
        with_lora["5"] = {**plain["5"], "inputs": {**plain["5"]["inputs"], "model": ["8", 0]}}
        service = Service(settings(comfyui, tmp_path))
        images = []
        for name, graph in (("plain", plain), ("lora", with_lora)):
            result = await service.run(f"lora-real-{name}", {"workflow": graph})
            assert "error" not in result, result
            with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["data"]))) as decoded:
                images.append(decoded.convert("RGB"))
        # Keys ComfyUI could not map would leave the model as it was, and the pixels the same
        # (file bytes always differ: ComfyUI writes each prompt into the PNG's text chunks). The
        # tiny model's two steps move few pixels, but the same seed on the CPU moves none.
        assert ImageChops.difference(*images).getbbox() is not None
        assert f"lora key not loaded: {TINY_LAYER}" not in requests.get(f"{comfyui.url}/internal/logs",
                                                                        timeout=10).json()
    finally:
        job.release()
        fetcher.cache.path(job.files[0].sha256).unlink()
