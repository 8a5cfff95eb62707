"""Settings from the environment, read once at cold start.

Every variable is documented in README.md ("Configuration"); the names here are the
single source of truth for that table.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Backend = Literal["comfyui", "vllm"]
NAMED_WORKFLOWS = ("i2v", "svi", "qwen_edit", "chat")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _default_models_dir() -> Path:
    volume = Path("/runpod-volume")
    return volume / "models" if volume.is_dir() else Path("/models")


class S3Settings(BaseModel):
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = Field(default=None, repr=False)
    url_ttl_s: int = 7 * 24 * 3600
    part_size_mb: int = 16
    max_concurrency: int = 4


class Settings(BaseModel):
    backends: list[Backend] = ["comfyui"]
    workflows: list[str] | None = None
    allow_raw_workflows: bool = True
    raw_node_allowlist: list[str] | None = None

    comfyui_dir: Path | None = None
    comfyui_url: str | None = None
    comfyui_python: str = sys.executable
    comfyui_port: int = 8188
    comfyui_args: list[str] = []

    vllm_url: str | None = None
    vllm_command: list[str] = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    vllm_model: str | None = None
    vllm_revision: str | None = None
    vllm_port: int = 8000
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_model_len: int | None = None
    vllm_args: list[str] = []
    concurrency: int = 1

    startup_timeout_s: float = 900.0
    job_timeout_s: float = 3600.0
    max_input_mb: float = 25.0
    max_inline_mb: float = 15.0
    allow_private_urls: bool = False
    models_dir: Path = Field(default_factory=_default_models_dir)
    work_dir: Path = Path("/tmp/diffbox")
    warmup: list[str] = []
    s3: S3Settings | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        values: dict[str, object] = {}
        if backends := _csv(get("DIFFBOX_BACKENDS")):
            values["backends"] = backends
        if workflows := _csv(get("DIFFBOX_WORKFLOWS")):
            values["workflows"] = workflows
        values["allow_raw_workflows"] = _flag(get("DIFFBOX_ALLOW_RAW_WORKFLOWS"), True)
        if allow := _csv(get("DIFFBOX_RAW_NODE_ALLOWLIST")):
            values["raw_node_allowlist"] = allow
        values["allow_private_urls"] = _flag(get("DIFFBOX_ALLOW_PRIVATE_URLS"), False)
        simple = {
            "comfyui_dir": "DIFFBOX_COMFYUI_DIR",
            "comfyui_url": "DIFFBOX_COMFYUI_URL",
            "comfyui_python": "DIFFBOX_COMFYUI_PYTHON",
            "comfyui_port": "DIFFBOX_COMFYUI_PORT",
            "vllm_url": "DIFFBOX_VLLM_URL",
            "vllm_model": "DIFFBOX_VLLM_MODEL",
            "vllm_revision": "DIFFBOX_VLLM_REVISION",
            "vllm_port": "DIFFBOX_VLLM_PORT",
            "vllm_gpu_memory_utilization": "DIFFBOX_VLLM_GPU_MEMORY_UTILIZATION",
            "vllm_max_model_len": "DIFFBOX_VLLM_MAX_MODEL_LEN",
            "concurrency": "DIFFBOX_CONCURRENCY",
            "startup_timeout_s": "DIFFBOX_STARTUP_TIMEOUT_S",
            "job_timeout_s": "DIFFBOX_JOB_TIMEOUT_S",
            "max_input_mb": "DIFFBOX_MAX_INPUT_MB",
            "max_inline_mb": "DIFFBOX_MAX_INLINE_MB",
            "models_dir": "DIFFBOX_MODELS_DIR",
            "work_dir": "DIFFBOX_WORK_DIR",
        }
        for field, name in simple.items():
            if (value := get(name)) is not None:
                values[field] = value
        for field, name in {
            "comfyui_args": "DIFFBOX_COMFYUI_ARGS",
            "vllm_args": "DIFFBOX_VLLM_ARGS",
            "vllm_command": "DIFFBOX_VLLM_COMMAND",
        }.items():
            if (value := get(name)) is not None:
                values[field] = shlex.split(value)
        if warmup := _csv(get("DIFFBOX_WARMUP")):
            values["warmup"] = warmup
        values["s3"] = _s3_from_env(get)
        return cls.model_validate(values)

    def serves(self, workflow: str) -> bool:
        """Whether this endpoint is configured to serve `workflow` (raw graphs: "raw")."""
        if workflow == "raw":
            return self.allow_raw_workflows and "comfyui" in self.backends
        if self.workflows is not None and workflow not in self.workflows:
            return False
        needed: Backend = "vllm" if workflow == "chat" else "comfyui"
        return needed in self.backends


def _s3_from_env(get: Callable[[str], str | None]) -> S3Settings | None:
    # RunPod's official worker names (BUCKET_*) are accepted so its users keep their settings.
    bucket = get("DIFFBOX_S3_BUCKET") or get("BUCKET_NAME")
    endpoint = get("DIFFBOX_S3_ENDPOINT_URL") or get("BUCKET_ENDPOINT_URL")
    if not bucket and endpoint:
        # RunPod's BUCKET_ENDPOINT_URL carries the bucket as the first label of the host.
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        if "." in host:
            bucket, _, rest = host.partition(".")
            endpoint = f"{parts.scheme}://{rest}" + (f":{parts.port}" if parts.port else "")
    if not bucket:
        return None
    values: dict[str, object] = {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": get("DIFFBOX_S3_REGION") or get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
        "access_key_id": get("AWS_ACCESS_KEY_ID") or get("BUCKET_ACCESS_KEY_ID"),
        "secret_access_key": get("AWS_SECRET_ACCESS_KEY") or get("BUCKET_SECRET_ACCESS_KEY"),
    }
    if ttl := get("DIFFBOX_S3_URL_TTL_S"):
        values["url_ttl_s"] = ttl
    if part := get("DIFFBOX_S3_PART_SIZE_MB"):
        values["part_size_mb"] = part
    return S3Settings.model_validate(values)
