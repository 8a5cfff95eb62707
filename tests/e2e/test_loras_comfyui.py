"""A LoRA fetched through the worker's cache is one ComfyUI finds by the name the graph gives
it (`diffbox-cache/<sha256>.safetensors` under the models folder's `loras`). Runs on the real
ComfyUI leg (and on the fake, whose validation lists model folders as ComfyUI does)."""

from __future__ import annotations

import uuid
from pathlib import Path

import requests

from diffbox.config import Settings
from diffbox.loras.fetch import fetcher_for
from diffbox.loras.request import LoraEntry
from diffbox.urls import UrlPolicy
from tests.conftest import ComfyTarget
from tests.fakes.hf_hub import serve_fake_hub
from tests.lorafiles import lora_bytes


def test_comfyui_validates_a_graph_naming_a_cached_lora(comfyui: ComfyTarget, tmp_path: Path) -> None:
    assert comfyui.base_dir is not None, "needs DIFFBOX_TEST_COMFYUI_DIR: the cache is on ComfyUI's disk"
    models = comfyui.base_dir / "models"
    with serve_fake_hub() as hub:
        sha = hub.add("someone/tiny", "tiny.safetensors", lora_bytes(int(uuid.uuid4().int % 1000)))
        settings = Settings(models_dir=models, hf_endpoint=hub.url, comfyui_url=comfyui.url)
        fetcher = fetcher_for(settings, UrlPolicy(), None)
        job = fetcher.fetch([LoraEntry(source="hf://someone/tiny/tiny.safetensors")], lambda done, total: None,
                            lambda: False, lambda: 60.0)
    try:
        [fetched] = job.files
        assert fetched.sha256 == sha and not fetched.cache_hit
        assert fetched.comfy_name in requests.get(f"{comfyui.url}/models/loras", timeout=10).json()
        # No model here to apply it to: the UNet's file is missing on purpose, and ComfyUI's
        # validation must find fault with that node only, not with the LoRA's name.
        graph = {
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
