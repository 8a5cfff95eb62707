"""RunPod Hub listing: `.runpod/hub.json` and `.runpod/tests.json`, written from the code.

The format is the one runpod-workers/worker-comfyui publishes (its `.runpod/hub.json`:
title, description, type, category, `config` with runsOn, containerDiskInGb, gpuIds, gpuCount,
allowedCudaVersions and `env` inputs each with a name, type, description, default and
`advanced`; its tests file: `tests` with name, input and timeout, and a `config`). Here the
`env` inputs are `Settings`' fields, the GPU pools follow from the weights the image bakes
by default, and the test is test_input.json's model-free raw graph.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import S3Settings, Settings, env_of
from .workflows import manifest

DOCKERFILE = "Dockerfile.serverless"
# RunPod GPU pools by memory (GB), as RunPod's worker configs name them (ADA_24 in
# worker-comfyui's hub.json; the others as public workers' configs list them).
POOLS = [("ADA_24", 24), ("AMPERE_48", 48), ("ADA_48_PRO", 48), ("AMPERE_80", 80), ("ADA_80_PRO", 80)]
# What a user sets first; the rest is under "advanced".
MAIN = ("DIFFBOX_WORKFLOWS", "DIFFBOX_S3_BUCKET", "DIFFBOX_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY")
# Room for inputs, outputs and ComfyUI's temp files beyond the image (docs/deploy-runpod.md).
CONTAINER_DISK_GB = 20
# The official worker's test: the same GPU and time limit (ms); ours needs no weights.
TEST_GPU = "NVIDIA GeForce RTX 4090"
TEST_TIMEOUT_MS = 300000
_WORDS = {"s3": "S3", "url": "URL", "urls": "URLs", "hf": "Hugging Face", "vllm": "vLLM", "comfyui": "ComfyUI",
          "gpu": "GPU", "lora": "LoRA", "mb": "(MB)", "gb": "(GB)", "s": "(s)", "id": "ID", "ttl": "TTL",
          "civitai": "CivitAI", "len": "length"}


def build_args(root: Path) -> dict[str, str]:
    """The Dockerfile's ARG defaults."""
    text = (root / DOCKERFILE).read_text()
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", text, re.M)}


def resident_gb(root: Path) -> float:
    """The largest set of weights one job keeps loaded (one model set and preset), of those the
    image bakes by default (MODELS, PRESETS), from the manifest's size estimates."""
    args = build_args(root)
    models = manifest.load()
    names = [n.strip() for n in args["MODELS"].split(",")]
    sets = [s for s in models.workflows for n in names if s == n or s.startswith(n + ":")]
    sizes = [sum(f.size for f in models.required(s, p.strip())) for s in sets for p in args["PRESETS"].split(",")]
    return max(sizes) / 1e9


def _title(field_name: str, model: type[BaseModel]) -> str:
    words = [_WORDS.get(w, w) for w in field_name.split("_")]
    if model is S3Settings:
        words.insert(0, "S3")
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _input(name: str, field: FieldInfo, model: type[BaseModel]) -> dict[str, Any]:
    spec = env_of(field)
    value = None if "shown" in spec or field.is_required() else field.get_default(call_default_factory=False)
    # A number without a default is offered as text: an empty field leaves it unset.
    numbers = (int, float, int | None, float | None)
    kind = "boolean" if field.annotation is bool else "number" if field.annotation in numbers else "string"
    if kind == "number" and value is None:
        kind = "string"
    if isinstance(value, list):
        value = shlex.join(value) if spec["split"] == "shell" else ",".join(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, Path):
        value = str(value)
    also = "".join(f"; also read from {other}" for other in spec["also"])
    return {"key": spec["env"], "input": {
        "name": _title(name, model), "type": kind,
        "description": (field.description or "") + also,
        "default": "" if value is None else value,
        "advanced": spec["env"] not in MAIN}}


def env_inputs() -> list[dict[str, Any]]:
    inputs = []
    for model in (Settings, S3Settings):
        for name, field in model.model_fields.items():
            spec = env_of(field)
            if "env" in spec and not spec["local"]:
                inputs.append(_input(name, field, model))
    return sorted(inputs, key=lambda entry: entry["key"] not in MAIN)


def cuda_versions(root: Path) -> list[str]:
    """The CUDA release of the image's base (`nvidia/cuda:12.8.1-...` -> 12.8)."""
    match = re.search(r"nvidia/cuda:(\d+\.\d+)", build_args(root)["CUDA_IMAGE"])
    if match is None:
        raise ValueError(f"{DOCKERFILE}: CUDA_IMAGE names no nvidia/cuda release")
    return [match[1]]


def hub_json(root: Path) -> dict[str, Any]:
    need = resident_gb(root)
    return {
        "title": "diffbox",
        "description": "Wan 2.2 image-to-video, SVI long video, Qwen Image Edit and raw ComfyUI graphs (the official "
                       "ComfyUI worker's input and output), with live progress and outputs to S3",
        "type": "serverless",
        "category": "image",
        "config": {
            "runsOn": "GPU",
            "containerDiskInGb": CONTAINER_DISK_GB,
            "gpuIds": ",".join(pool for pool, memory in POOLS if memory > need),
            "gpuCount": 1,
            "allowedCudaVersions": cuda_versions(root),
            "env": env_inputs(),
        },
    }


def tests_json(root: Path) -> dict[str, Any]:
    request = json.loads((root / "test_input.json").read_text())["input"]
    return {
        "tests": [{"name": "raw_graph_invert_and_video", "input": request, "timeout": TEST_TIMEOUT_MS}],
        "config": {"gpuTypeId": TEST_GPU, "gpuCount": 1, "env": [], "allowedCudaVersions": cuda_versions(root)},
    }


def files(root: Path) -> dict[str, str]:
    return {".runpod/hub.json": json.dumps(hub_json(root), indent=2, ensure_ascii=False) + "\n",
            ".runpod/tests.json": json.dumps(tests_json(root), indent=2, ensure_ascii=False) + "\n"}
