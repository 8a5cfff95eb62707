"""Settings from the environment, read once at cold start.

Each setting names its environment variable and says what it does here; the configuration
page (docs/configuration.md) and RunPod's Hub listing (.runpod/hub.json) are written from
these fields by `python -m diffbox docs`, and a test fails when they differ.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import logs

Backend = Literal["comfyui", "vllm"]
NAMED_WORKFLOWS = ("i2v", "svi", "qwen_edit", "chat")
# How a list setting is written in its variable: comma-separated, or shell-quoted words.
Split = Literal["csv", "shell"]


def flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _default_models_dir() -> Path:
    volume = Path("/runpod-volume")
    return volume / "models" if volume.is_dir() else Path("/models")


def setting(default: Any = PydanticUndefined, *, env: str, description: str, shown: str | None = None,
            split: Split = "csv", also: tuple[str, ...] = (), local: bool = False, **constraints: Any) -> Any:
    """A field read from the variable `env` (or, when it is unset, from those in `also`).
    `shown` is the default as the docs say it, where the value itself depends on the machine;
    `local`: a path or server of the machine the worker runs on, which an image sets itself
    (RunPod's Hub listing leaves it out)."""
    extra: dict[str, Any] = {"env": env, "split": split, "also": list(also), "local": local}
    if shown is not None:
        extra["shown"] = shown
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def env_of(field: FieldInfo) -> dict[str, Any]:
    """A setting's `env`, `split`, `also` and `shown`, as `setting` recorded them."""
    extra = field.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


class S3Settings(BaseModel):
    bucket: str = setting(
        env="DIFFBOX_S3_BUCKET", also=("BUCKET_NAME",), min_length=3, max_length=63,
        description="the bucket; setting it (or a `BUCKET_ENDPOINT_URL` naming one) turns S3 on")
    endpoint_url: str | None = setting(
        None, env="DIFFBOX_S3_ENDPOINT_URL", also=("BUCKET_ENDPOINT_URL",), shown="AWS",
        description="an S3-compatible endpoint (`https://<account>.r2.cloudflarestorage.com`, `http://minio:9000`); "
                    "a virtual-hosted one names the bucket in its host")
    region: str | None = setting(
        None, env="DIFFBOX_S3_REGION", also=("AWS_REGION", "AWS_DEFAULT_REGION"),
        shown="the endpoint's, else `AWS_REGION`", description="signing region (`auto` for R2)")
    # None leaves credentials to boto3's own chain (AWS_PROFILE, instance and task roles).
    access_key_id: str | None = setting(
        None, env="AWS_ACCESS_KEY_ID", also=("BUCKET_ACCESS_KEY_ID",), shown="boto3's chain",
        description="access key id (a profile or an instance role works too)")
    secret_access_key: str | None = setting(
        None, env="AWS_SECRET_ACCESS_KEY", also=("BUCKET_SECRET_ACCESS_KEY",), shown="boto3's chain", repr=False,
        description="the secret of that key id (never logged)")
    session_token: str | None = setting(
        None, env="AWS_SESSION_TOKEN", shown="boto3's chain", repr=False,
        description="session token of temporary credentials")
    prefix: str = setting(
        "", env="DIFFBOX_S3_PREFIX", also=("BUCKET_PREFIX",),
        description="key prefix; a request's `output.prefix` replaces it")
    # SigV4 presigned URLs cannot live longer than 7 days.
    url_ttl_s: int = setting(
        7 * 24 * 3600, env="DIFFBOX_S3_URL_TTL_S", ge=1, le=7 * 24 * 3600,
        description="presigned URLs' lifetime (7 days, the most S3 allows)")
    # S3's part limits (5 MiB to 5 GiB); memory held by uploads is about part size x concurrency.
    part_size_mb: int = setting(16, env="DIFFBOX_S3_PART_SIZE_MB", ge=5, le=5120,
                                description="multipart part size (5 at least)")
    # Files up to this size go in one streamed PUT: one request instead of three or more (the
    # memory is the same, read from disk as it is sent); rclone's cutoff is 200 MiB.
    multipart_threshold_mb: int = setting(
        64, env="DIFFBOX_S3_MULTIPART_THRESHOLD_MB", ge=5, le=5120,
        description="files up to this size go in one streamed request (5 at least), larger ones in parts")
    max_concurrency: int = setting(4, env="DIFFBOX_S3_CONCURRENCY", ge=1, le=64,
                                   description="parts in flight, all jobs of the worker together")
    retry_mode: Literal["standard", "adaptive"] = setting(
        "standard", env="DIFFBOX_S3_RETRY_MODE",
        description="botocore's retry mode for transient errors: `standard` or `adaptive`")
    max_attempts: int = setting(3, env="DIFFBOX_S3_MAX_ATTEMPTS", ge=1, le=20,
                                description="attempts per request, the first included")
    connect_timeout_s: float = setting(5.0, env="DIFFBOX_S3_CONNECT_TIMEOUT_S", gt=0,
                                       description="so an unreachable store fails a job in seconds")
    read_timeout_s: float = setting(
        60.0, env="DIFFBOX_S3_READ_TIMEOUT_S", gt=0,
        description="a completing multipart upload of a large file can be slow to answer")


class Settings(BaseModel):
    backends: list[Backend] = setting(
        ["comfyui"], env="DIFFBOX_BACKENDS",
        description="backends to start at cold start, comma-separated: `comfyui`, `vllm`")
    workflows: list[str] | None = setting(
        None, env="DIFFBOX_WORKFLOWS", shown="all",
        description="workflows this endpoint serves (`i2v,svi,qwen_edit,chat`); others are refused")
    allow_raw_workflows: bool = setting(True, env="DIFFBOX_ALLOW_RAW_WORKFLOWS", description="`0` refuses raw graphs")
    raw_node_allowlist: list[str] | None = setting(
        None, env="DIFFBOX_RAW_NODE_ALLOWLIST", description="comma-separated node classes a raw graph may use")

    comfyui_dir: Path | None = setting(
        None, env="DIFFBOX_COMFYUI_DIR", local=True,
        description="a ComfyUI install the worker starts (`python main.py` there); with `DIFFBOX_COMFYUI_URL`, "
                    "where that server's folders are")
    comfyui_url: str | None = setting(None, env="DIFFBOX_COMFYUI_URL", local=True,
                                      description="attach to a running ComfyUI instead of starting one")
    comfyui_python: str = setting(sys.executable, env="DIFFBOX_COMFYUI_PYTHON", local=True, shown="this Python",
                                  description="the Python that runs ComfyUI (its own venv)")
    comfyui_port: int = setting(8188, env="DIFFBOX_COMFYUI_PORT", local=True,
                                description="loopback port of the started ComfyUI")
    comfyui_args: list[str] = setting(
        [], env="DIFFBOX_COMFYUI_ARGS", split="shell",
        description="extra ComfyUI flags, shell-quoted (e.g. `--cpu`, `--highvram`)")

    vllm_url: str | None = setting(None, env="DIFFBOX_VLLM_URL", local=True,
                                   description="attach to a running vLLM OpenAI server instead of starting one")
    vllm_command: list[str] = setting(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server"], env="DIFFBOX_VLLM_COMMAND", local=True,
        split="shell",
        shown="this Python `-m vllm.entrypoints.openai.api_server`",
        description="the command that starts vLLM's OpenAI server, shell-quoted; name vLLM's own environment "
                    "(`/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server`)")
    vllm_model: str | None = setting(
        None, env="DIFFBOX_VLLM_MODEL",
        description="the model vLLM serves: a local path (e.g. `/models/llm/ORG/NAME`) or a Hugging Face id; needed "
                    "with `vllm` in `DIFFBOX_BACKENDS` unless `DIFFBOX_VLLM_URL` is set")
    vllm_revision: str | None = setting(None, env="DIFFBOX_VLLM_REVISION",
                                        description="the Hugging Face revision of that id (`--revision`)")
    vllm_port: int = setting(8000, env="DIFFBOX_VLLM_PORT", local=True, description="loopback port of the started vLLM")
    vllm_gpu_memory_utilization: float = setting(
        0.9, env="DIFFBOX_VLLM_GPU_MEMORY_UTILIZATION",
        description="share of the GPU vLLM reserves up front; lower it where ComfyUI shares the card")
    vllm_max_model_len: int | None = setting(
        None, env="DIFFBOX_VLLM_MAX_MODEL_LEN", shown="the model's",
        description="context length (`--max-model-len`); a shorter one needs less KV cache")
    vllm_args: list[str] = setting(
        [], env="DIFFBOX_VLLM_ARGS", split="shell",
        description="extra vLLM flags, shell-quoted (e.g. `--served-model-name dolphin --enforce-eager`); they win "
                    "over the ones above")
    concurrency: int = setting(
        1, env="DIFFBOX_CONCURRENCY", ge=1,
        description="jobs a worker takes at once where only vLLM runs (it batches them); an endpoint with ComfyUI "
                    "takes one")

    startup_timeout_s: float = setting(
        900.0, env="DIFFBOX_STARTUP_TIMEOUT_S",
        description="how long a job waits for a backend to become ready (a started backend that stops answering "
                    "for 60 s is restarted first)")
    job_timeout_s: float = setting(3600.0, env="DIFFBOX_JOB_TIMEOUT_S",
                                   description="a job running longer is interrupted: `type: \"timeout\"`")
    max_input_mb: float = setting(25.0, env="DIFFBOX_MAX_INPUT_MB",
                                  description="size limit of each input image, checked before decoding")
    max_inline_mb: float = setting(15.0, env="DIFFBOX_MAX_INLINE_MB",
                                   description="total size of inline (base64) outputs; above it, configure S3")
    allow_private_urls: bool = setting(
        False, env="DIFFBOX_ALLOW_PRIVATE_URLS",
        description="`1` lets image URLs use `http://` and private, loopback and link-local addresses: only on a "
                    "trusted network (see SECURITY.md)")
    models_dir: Path = setting(
        env="DIFFBOX_MODELS_DIR", default_factory=_default_models_dir,
        shown="`/runpod-volume/models` if that volume is mounted, else `/models`",
        description="model weights, in ComfyUI's folder layout")
    work_dir: Path = setting(Path("/tmp/diffbox"), env="DIFFBOX_WORK_DIR", local=True,
                             description="per-job temporary files, removed when the job ends")
    warmup: list[str] = setting(
        [], env="DIFFBOX_WARMUP",
        description="requests run at cold start before the first job, comma-separated `workflow[:preset][:model]` "
                    "(e.g. `i2v:fast,qwen_edit:fast:2511`), so the first user does not pay for loading weights; the "
                    "time is logged and reported as `timings.warmup_s` of the first result")
    prefetch: list[str] | None = setting(
        None, env="DIFFBOX_PREFETCH", shown="the entries of `DIFFBOX_WARMUP`",
        description="weights read into memory (the page cache) at cold start, in parallel and while ComfyUI starts, "
                    "so the first job does not wait for a slow disk or network volume: `workflow[:preset][:model]` "
                    "entries as in `DIFFBOX_WARMUP`, or `off` (docs/cold-start.md)")
    prefetch_threads: int = setting(8, env="DIFFBOX_PREFETCH_THREADS", ge=1, le=64,
                                    description="reads the prefetch keeps in flight (eight read five times as fast "
                                                "as one on the disk docs/cold-start.md measured)")
    prefetch_reserve_gb: float = setting(
        4.0, env="DIFFBOX_PREFETCH_RESERVE_GB", ge=0,
        description="memory the prefetch leaves free, for ComfyUI's own allocations: it reads only into memory "
                    "that no one uses (not even the page cache) beyond this, and stops there")
    # Read by _s3_from_env from the variables of S3Settings' fields.
    s3: S3Settings | None = None
    # LoRAs requests bring (diffbox/loras): the cache's budget and one file's size cap.
    lora_cache_gb: float = setting(
        50.0, env="DIFFBOX_LORA_CACHE_GB", ge=0,
        description="disk budget of the LoRA cache; least recently used files beyond it are removed, never one a "
                    "running job uses")
    max_lora_mb: float = setting(2048.0, env="DIFFBOX_MAX_LORA_MB", gt=0,
                                 description="size limit of one LoRA file, enforced while it downloads")
    hf_endpoint: str = setting("https://huggingface.co", env="HF_ENDPOINT",
                               description="the Hub `hf://` LoRAs come from (a mirror)")
    hf_token: str | None = setting(
        None, env="HF_TOKEN", repr=False,
        description="Hugging Face token for `hf://` LoRAs in gated or private repos (sent to the Hub only)")
    civitai_token: str | None = setting(
        None, env="CIVITAI_TOKEN", repr=False,
        description="CivitAI API token for LoRAs that need one (sent to `civitai.com` hosts only)")
    # Read by logs.setup before anything else (they are here to be validated and documented).
    log_level: Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"] = setting(
        "INFO", env=logs.LEVEL_VAR, description="`DEBUG` also echoes the backends' own output")
    log_format: Literal["auto", "human", "json"] = setting(
        "auto", env=logs.FORMAT_VAR,
        description="`human`: short lines (time, level, message, a few fields); `json`: one JSON object per line; "
                    "`auto`: human on a terminal, JSON elsewhere (RunPod, Modal, CI)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        values = _read(cls, get)
        if "log_level" in values:
            values["log_level"] = str(values["log_level"]).upper()
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

    def prefetch_entries(self) -> list[str]:
        """DIFFBOX_PREFETCH's entries: the warm-up's unless it names its own, none when `off`."""
        if self.prefetch is None:
            return self.warmup
        return [] if [entry.lower() for entry in self.prefetch] == ["off"] else self.prefetch

    def job_concurrency(self) -> int:
        """How many jobs the worker takes at once: DIFFBOX_CONCURRENCY where only vLLM runs
        (it batches concurrent requests), one where ComfyUI does. ComfyUI runs one graph at a
        time, and a job queued inside a busy worker would wait there while the platform could
        give it to an idle one."""
        return 1 if "comfyui" in self.backends else self.concurrency


def _read(model: type[BaseModel], get: Callable[[str], str | None]) -> dict[str, object]:
    """The values of `model`'s settings whose variable is set: flags as flags, lists split as
    their setting says; the rest is left to the model's own validation."""
    values: dict[str, object] = {}
    for name, field in model.model_fields.items():
        spec = env_of(field)
        if "env" not in spec or (raw := get(spec["env"])) is None:
            continue
        if field.annotation is bool:
            values[name] = flag(raw, bool(field.default))
        elif list in (get_origin(field.annotation), *map(get_origin, get_args(field.annotation))):
            if parts := (shlex.split(raw) if spec["split"] == "shell" else _csv(raw)):
                values[name] = parts
        else:
            values[name] = raw
    return values


def _names(field: str) -> list[str]:
    """The variables an S3 setting is read from, in order."""
    spec = env_of(S3Settings.model_fields[field])
    return [spec["env"], *spec["also"]]


def _s3_from_env(get: Callable[[str], str | None]) -> S3Settings | None:
    # RunPod's official worker names (BUCKET_*) are accepted so its users keep their settings.
    bucket_var = next((name for name in _names("bucket") if get(name)), _names("bucket")[0])
    endpoint_var = next((name for name in _names("endpoint_url") if get(name)), _names("endpoint_url")[0])
    bucket, endpoint = get(bucket_var), get(endpoint_var)
    endpoint_region = None
    if endpoint:
        host_bucket, endpoint, endpoint_region = split_s3_endpoint(endpoint)
        if host_bucket and bucket and host_bucket != bucket:
            raise ValueError(f"{endpoint_var} names bucket {host_bucket!r} but {bucket_var} says {bucket!r}")
        bucket = bucket or host_bucket
        if not bucket:
            raise ValueError(f"{endpoint_var} names no bucket in its host: set {_names('bucket')[0]}")
    if not bucket:
        return None
    special = ("bucket", "endpoint_url", "region", "prefix", "access_key_id", "secret_access_key", "session_token")
    values = {name: value for name, value in _read(S3Settings, get).items() if name not in special}
    region_var, *fallbacks = _names("region")
    values |= {
        "bucket": bucket,
        "endpoint_url": endpoint,
        # The endpoint's own region comes before the AWS-wide variables.
        "region": get(region_var) or endpoint_region or next(filter(None, map(get, fallbacks)), None),
        "prefix": (next(filter(None, map(get, _names("prefix"))), None) or "").strip("/"),
    }
    # A key id and its secret always come from the same pair of variables (AWS_* or BUCKET_*).
    for pair, key_var in enumerate(_names("access_key_id")):
        if get(key_var):
            values["access_key_id"] = get(key_var)
            values["secret_access_key"] = get(_names("secret_access_key")[pair])
            if pair == 0:
                values["session_token"] = get(_names("session_token")[0])
            break
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
