"""Settings from the environment, read once at cold start.

Every variable is documented in README.md ("Configuration"); the names here are the
single source of truth for that table.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

Backend = Literal["comfyui", "vllm"]
NAMED_WORKFLOWS = ("i2v", "svi", "qwen_edit", "chat")


def flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _default_models_dir() -> Path:
    volume = Path("/runpod-volume")
    return volume / "models" if volume.is_dir() else Path("/models")


class S3Settings(BaseModel):
    bucket: str = Field(min_length=3, max_length=63)
    endpoint_url: str | None = None
    region: str | None = None
    # None leaves credentials to boto3's own chain (AWS_PROFILE, instance and task roles).
    access_key_id: str | None = None
    secret_access_key: str | None = Field(default=None, repr=False)
    session_token: str | None = Field(default=None, repr=False)
    prefix: str = ""
    # SigV4 presigned URLs cannot live longer than 7 days.
    url_ttl_s: int = Field(default=7 * 24 * 3600, ge=1, le=7 * 24 * 3600)
    # S3's part limits (5 MiB to 5 GiB); memory held by uploads is about part size x concurrency.
    part_size_mb: int = Field(default=16, ge=5, le=5120)
    # Files up to this size go in one streamed PUT: one request instead of three or more (the
    # memory is the same, read from disk as it is sent); rclone's cutoff is 200 MiB.
    multipart_threshold_mb: int = Field(default=64, ge=5, le=5120)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = Field(default=3, ge=1, le=20)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)


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
    concurrency: int = Field(default=1, ge=1)

    startup_timeout_s: float = 900.0
    job_timeout_s: float = 3600.0
    max_input_mb: float = 25.0
    max_inline_mb: float = 15.0
    allow_private_urls: bool = False
    models_dir: Path = Field(default_factory=_default_models_dir)
    work_dir: Path = Path("/tmp/diffbox")
    warmup: list[str] = []
    s3: S3Settings | None = None
    # LoRAs requests bring (diffbox/loras): the cache's budget and one file's size cap.
    lora_cache_gb: float = Field(default=50.0, ge=0)
    max_lora_mb: float = Field(default=2048.0, gt=0)
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = Field(default=None, repr=False)
    civitai_token: str | None = Field(default=None, repr=False)

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
        values["allow_raw_workflows"] = flag(get("DIFFBOX_ALLOW_RAW_WORKFLOWS"), True)
        if allow := _csv(get("DIFFBOX_RAW_NODE_ALLOWLIST")):
            values["raw_node_allowlist"] = allow
        values["allow_private_urls"] = flag(get("DIFFBOX_ALLOW_PRIVATE_URLS"), False)
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
            "lora_cache_gb": "DIFFBOX_LORA_CACHE_GB",
            "max_lora_mb": "DIFFBOX_MAX_LORA_MB",
            "hf_endpoint": "HF_ENDPOINT",
            "hf_token": "HF_TOKEN",
            "civitai_token": "CIVITAI_TOKEN",
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

    def job_concurrency(self) -> int:
        """How many jobs the worker takes at once: DIFFBOX_CONCURRENCY where only vLLM runs
        (it batches concurrent requests), one where ComfyUI does. ComfyUI runs one graph at a
        time, and a job queued inside a busy worker would wait there while the platform could
        give it to an idle one."""
        return 1 if "comfyui" in self.backends else self.concurrency


def _s3_from_env(get: Callable[[str], str | None]) -> S3Settings | None:
    # RunPod's official worker names (BUCKET_*) are accepted so its users keep their settings.
    bucket = get("DIFFBOX_S3_BUCKET") or get("BUCKET_NAME")
    bucket_var = "DIFFBOX_S3_BUCKET" if get("DIFFBOX_S3_BUCKET") else "BUCKET_NAME"
    endpoint_var = "DIFFBOX_S3_ENDPOINT_URL" if get("DIFFBOX_S3_ENDPOINT_URL") else "BUCKET_ENDPOINT_URL"
    endpoint = get(endpoint_var)
    endpoint_region = None
    if endpoint:
        host_bucket, endpoint, endpoint_region = split_s3_endpoint(endpoint)
        if host_bucket and bucket and host_bucket != bucket:
            raise ValueError(f"{endpoint_var} names bucket {host_bucket!r} but {bucket_var} says {bucket!r}")
        bucket = bucket or host_bucket
        if not bucket:
            raise ValueError(f"{endpoint_var} names no bucket in its host: set DIFFBOX_S3_BUCKET")
    if not bucket:
        return None
    values: dict[str, object] = {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": get("DIFFBOX_S3_REGION") or endpoint_region or get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
        "prefix": (get("DIFFBOX_S3_PREFIX") or get("BUCKET_PREFIX") or "").strip("/"),
    }
    # A key id and its secret always come from the same pair of variables.
    if get("AWS_ACCESS_KEY_ID"):
        values["access_key_id"] = get("AWS_ACCESS_KEY_ID")
        values["secret_access_key"] = get("AWS_SECRET_ACCESS_KEY")
        values["session_token"] = get("AWS_SESSION_TOKEN")
    elif get("BUCKET_ACCESS_KEY_ID"):
        values["access_key_id"] = get("BUCKET_ACCESS_KEY_ID")
        values["secret_access_key"] = get("BUCKET_SECRET_ACCESS_KEY")
    for field, name in {
        "url_ttl_s": "DIFFBOX_S3_URL_TTL_S",
        "part_size_mb": "DIFFBOX_S3_PART_SIZE_MB",
        "multipart_threshold_mb": "DIFFBOX_S3_MULTIPART_THRESHOLD_MB",
        "max_concurrency": "DIFFBOX_S3_CONCURRENCY",
        "retry_mode": "DIFFBOX_S3_RETRY_MODE",
        "max_attempts": "DIFFBOX_S3_MAX_ATTEMPTS",
        "connect_timeout_s": "DIFFBOX_S3_CONNECT_TIMEOUT_S",
        "read_timeout_s": "DIFFBOX_S3_READ_TIMEOUT_S",
    }.items():
        if (value := get(name)) is not None:
            values[field] = value
    return S3Settings.model_validate(values)


# A virtual-hosted endpoint: `{bucket}.s3.{region}.amazonaws.com` (and the Backblaze, Wasabi,
# ... hosts of that form), `{bucket}.s3-{region}.amazonaws.com`, `{bucket}.{region}.digitaloceanspaces.com`.
_VIRTUAL_HOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]*?)\.(?P<service>s3[.-].+|[a-z0-9-]+\.digitaloceanspaces\.com)$"
)
_REGION = re.compile(r"^(?:s3[.-](?P<s3>[a-z0-9-]+)\.|(?P<do>[a-z0-9-]+)\.digitaloceanspaces\.com$)")


def split_s3_endpoint(url: str) -> tuple[str | None, str, str | None]:
    """(bucket in the host, service endpoint, region in the host) of an S3 endpoint URL.

    RunPod's SDK (`rp_upload`, which the official ComfyUI worker uses) sends path-style
    requests to BUCKET_ENDPOINT_URL unchanged, with a bucket named after the month; on a
    virtual-hosted URL the store takes the bucket from the host and that month becomes the
    first part of the key. So a bucket in the host is the bucket, and the endpoint is the
    rest of the host (boto3 addresses a bucket on it itself). Its region is read as the
    SDK's `extract_region_from_url` does (".s3." hosts and DigitalOcean Spaces).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    bucket = None
    if (match := _VIRTUAL_HOST.match(host)) is not None:
        bucket, host = match["bucket"], match["service"]
        netloc = host + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
    region_match = _REGION.match(host)
    region = (region_match["s3"] or region_match["do"]) if region_match else None
    # Region names carry a digit; `bucket.s3.amazonaws.com` has none (the SDK reads "amazonaws").
    return bucket, url, region if region and any(c.isdigit() for c in region) else None
