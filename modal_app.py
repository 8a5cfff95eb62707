"""Modal entry point: the same requests and results as the RunPod handler, on Modal.

    modal run modal_app.py::download_models --workflows i2v   # weights into the Volume
    modal deploy modal_app.py                                 # the GPU class and the web API

`Worker` is the GPU class: `run(input) -> result` (the RunPod handler's contract) and
`stream(input)` (a generator: `{"progress": ...}` events, then the result or chat chunks).
`web` serves RunPod's HTTP API (`/run`, `/runsync`, `/status/{id}`, `/cancel/{id}`) from a
small CPU container that spawns `Worker.run` calls, so polling never holds a GPU. Progress is
written to a `modal.Dict` under the call id, which is also the job id `/run` returns.

Deploy-time settings are environment variables read where `modal deploy` runs:
DIFFBOX_MODAL_GPU (default H100; a comma-separated list is a fallback order),
DIFFBOX_MODAL_SNAPSHOT (memory snapshots, on by default; 0 turns them off),
DIFFBOX_MODAL_GPU_SNAPSHOT (Modal's alpha GPU memory snapshots, off by default),
DIFFBOX_MODAL_SCALEDOWN_S, DIFFBOX_MODAL_S3_SECRET / DIFFBOX_MODAL_HF_SECRET (names of Modal
Secrets, none by default), DIFFBOX_MODAL_API_SECRET (a Secret holding DIFFBOX_API_KEY;
"diffbox-api" by default, empty for a public endpoint), and the worker's own DIFFBOX_*
settings, which are passed on to its containers.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal
import modal.exception
from fastapi import FastAPI

from diffbox import runtime
from diffbox.api.http_api import Jobs, JobStatus, create_app
from diffbox.api.jobs import ProgressPublisher, run_job, stream_job
from diffbox.config import Settings, flag
from diffbox.service import Service

REPO = Path(__file__).resolve().parent
# The build of Dockerfile.serverless (its ARG defaults; tests/unit/test_modal_app.py checks that
# they agree): the same CUDA base, uv, torch build, and ComfyUI with its nodes installed by the
# same `python -m builder comfyui` from workflows/comfyui.json.
CUDA_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"
PYTHON_VERSION = "3.11"
UV_VERSION = "0.13.8"
APT_PACKAGES = ("ca-certificates", "git", "libgl1", "libglib2.0-0")
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
TORCH_PACKAGES = "torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1"
VLLM_VERSION = "0.32.0"
COMFYUI_HOME = "/opt/comfy"
VLLM_HOME = "/opt/vllm"
# What `python -m builder` imports, as Dockerfile.serverless copies it for its builder layers:
# with only these built in (and an empty diffbox/workflows/__init__.py, which would import
# every workflow), a code change elsewhere keeps the ComfyUI layer cached.
BUILDER_FILES = ("diffbox/__init__.py", "diffbox/errors.py", "diffbox/model_lock.py", "diffbox/model_paths.py",
                 "diffbox/inputs/__init__.py", "diffbox/inputs/media.py",
                 "diffbox/workflows/base.py", "diffbox/workflows/graph.py", "diffbox/workflows/manifest.py")
MODELS_DIR = "/models"
# Where the package's sources are mounted: diffbox/ finds workflows/ beside itself.
SRC = "/root"
# Worker settings that name paths or servers of the machine running `modal deploy`, or a
# secret: never passed on to the containers.
_LOCAL_ONLY = {"DIFFBOX_COMFYUI_DIR", "DIFFBOX_COMFYUI_URL", "DIFFBOX_COMFYUI_PYTHON", "DIFFBOX_VLLM_URL",
               "DIFFBOX_VLLM_COMMAND", "DIFFBOX_MODELS_DIR", "DIFFBOX_WORK_DIR", "DIFFBOX_API_KEY"}
# Modal's web proxy answers with a redirect after 150 s; /runsync answers before that.
WEB_MAX_WAIT_S = 140.0
MODAL_MAX_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class DeployConfig:
    app_name: str
    gpu: str | list[str]
    scaledown_s: int
    volume: str
    progress_dict: str
    s3_secret: str | None
    hf_secret: str | None
    api_secret: str | None
    worker_env: dict[str, str | None]
    with_vllm: bool
    concurrency: int
    timeout_s: int
    startup_timeout_s: int
    snapshot: bool
    gpu_snapshot: bool

    @property
    def snapshot_kind(self) -> runtime.Snapshot:
        return "gpu" if self.gpu_snapshot else "cpu" if self.snapshot else "none"


def deploy_config(env: Mapping[str, str]) -> DeployConfig:
    def get(name: str, default: str = "") -> str:
        return env.get(name) or default

    gpus = [g.strip() for g in get("DIFFBOX_MODAL_GPU", "H100").split(",") if g.strip()]
    forwarded = {k: v for k, v in env.items() if k.startswith("DIFFBOX_") and v
                 and not k.startswith(("DIFFBOX_MODAL_", "DIFFBOX_TEST_")) and k not in _LOCAL_ONLY}
    worker_env: dict[str, str] = {**forwarded, "DIFFBOX_COMFYUI_DIR": f"{COMFYUI_HOME}/ComfyUI",
                                  "DIFFBOX_COMFYUI_PYTHON": f"{COMFYUI_HOME}/venv/bin/python",
                                  "DIFFBOX_MODELS_DIR": MODELS_DIR}
    settings = Settings.from_env(worker_env)
    with_vllm = "vllm" in settings.backends
    if with_vllm:
        worker_env["DIFFBOX_VLLM_COMMAND"] = f"{VLLM_HOME}/bin/python -m vllm.entrypoints.openai.api_server"
    # A job may wait for the backends, then run to its own timeout: Modal's bound comes after
    # both, so the worker's clearer timeout error is what a caller sees. Warm-up runs jobs in
    # `@modal.enter`, before the container takes any.
    margin = 300
    snapshot = flag(env.get("DIFFBOX_MODAL_SNAPSHOT"), True)
    return DeployConfig(
        app_name=get("DIFFBOX_MODAL_APP", "diffbox"),
        gpu=gpus[0] if len(gpus) == 1 else gpus,
        # Idle minutes cost less than cold starts (ComfyUI boot plus tens of GB of weights).
        scaledown_s=int(get("DIFFBOX_MODAL_SCALEDOWN_S", "300")),
        volume=get("DIFFBOX_MODAL_VOLUME", "diffbox-models"),
        progress_dict=get("DIFFBOX_MODAL_PROGRESS_DICT", "diffbox-progress"),
        s3_secret=get("DIFFBOX_MODAL_S3_SECRET") or None,
        hf_secret=get("DIFFBOX_MODAL_HF_SECRET") or None,
        # Set but empty: a public endpoint.
        api_secret=env.get("DIFFBOX_MODAL_API_SECRET", "diffbox-api") or None,
        worker_env={**worker_env},
        with_vllm=with_vllm,
        concurrency=settings.job_concurrency(),
        timeout_s=min(int(settings.startup_timeout_s + settings.job_timeout_s) + margin, MODAL_MAX_TIMEOUT_S),
        startup_timeout_s=min(int(settings.startup_timeout_s + len(settings.warmup) * settings.job_timeout_s)
                              + margin, MODAL_MAX_TIMEOUT_S),
        snapshot=snapshot,
        gpu_snapshot=snapshot and flag(env.get("DIFFBOX_MODAL_GPU_SNAPSHOT"), False),
    )


CONFIG = deploy_config(os.environ)


def _with_sources(image: modal.Image) -> modal.Image:
    # Mounted at container start, not built in: a code change redeploys in seconds.
    ignore = ["**/__pycache__", "**/*.pyc"]
    return (image.add_local_dir(REPO / "diffbox", f"{SRC}/diffbox", ignore=ignore)
            .add_local_dir(REPO / "builder", f"{SRC}/builder", ignore=ignore)
            .add_local_dir(REPO / "workflows", f"{SRC}/workflows"))


def _python_env(image: modal.Image) -> modal.Image:
    # The locked dependencies of uv.lock without the dev group, as in Dockerfile.serverless
    # (the package itself is mounted by _with_sources); uv stays at /.uv/uv.
    return image.uv_sync(str(REPO), extras=["modal"], uv_version=UV_VERSION).env(
        {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})


def _gpu_image(with_vllm: bool) -> modal.Image:
    image = _python_env(modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON_VERSION)
                        .apt_install(*APT_PACKAGES, env={"DEBIAN_FRONTEND": "noninteractive"}))
    package = ~modal.FilePatternMatcher(*(name.removeprefix("diffbox/") for name in BUILDER_FILES))
    image = (
        image.add_local_dir(REPO / "builder", "/build/builder", copy=True, ignore=["**/__pycache__"])
        .add_local_dir(REPO / "diffbox", "/build/diffbox", copy=True, ignore=package)
        .add_local_file(REPO / "workflows" / "comfyui.json", "/build/workflows/comfyui.json", copy=True)
        .run_commands(
            "touch /build/diffbox/workflows/__init__.py",
            # /.uv on PATH: the builder makes ComfyUI's venv with uv when it finds it.
            f"cd /build && PATH=/.uv:$PATH python -m builder comfyui --dest {COMFYUI_HOME} "
            f"--torch-index {TORCH_INDEX} --torch '{TORCH_PACKAGES}'",
        )
    )
    if with_vllm:
        # A venv of its own: vLLM pins its own torch, which need not be ComfyUI's.
        image = image.run_commands(f"/.uv/uv venv {VLLM_HOME} --python {PYTHON_VERSION}",
                                   f"/.uv/uv pip install --python {VLLM_HOME}/bin/python vllm=={VLLM_VERSION}")
    return _with_sources(image)


gpu_image = _gpu_image(CONFIG.with_vllm)
# For the web API and the weights download: the same package and locked dependencies, no CUDA.
cpu_image = _with_sources(_python_env(modal.Image.debian_slim(python_version=PYTHON_VERSION)))

app = modal.App(CONFIG.app_name)
models = modal.Volume.from_name(CONFIG.volume, create_if_missing=True)
# Progress payloads by call id; entries expire after 7 days without reads or writes.
progress = modal.Dict.from_name(CONFIG.progress_dict, create_if_missing=True)


def _secrets(*names: str | None, required: tuple[str, ...] = ()) -> list[modal.Secret]:
    return [modal.Secret.from_name(name, required_keys=list(required)) for name in names if name]


def _concurrency(cls: type[Any]) -> Any:
    # Above one, Modal runs sync inputs on threads and cancels one by restarting the container
    # (with the others rescheduled); at one it interrupts just that input, so only vLLM-only
    # workers (which batch requests) take several at once, as on RunPod.
    return modal.concurrent(max_inputs=CONFIG.concurrency)(cls) if CONFIG.concurrency > 1 else cls


@app.cls(
    image=gpu_image,
    gpu=CONFIG.gpu,
    volumes={MODELS_DIR: models},
    secrets=_secrets(CONFIG.s3_secret, CONFIG.hf_secret),
    env=CONFIG.worker_env,
    scaledown_window=CONFIG.scaledown_s,
    timeout=CONFIG.timeout_s,
    startup_timeout=CONFIG.startup_timeout_s,
    enable_memory_snapshot=CONFIG.snapshot,
    experimental_options={"enable_gpu_snapshot": True} if CONFIG.gpu_snapshot else None,
)
@_concurrency
class Worker:
    service: Service

    # Modal runs the `snap=True` hook once, before it takes the snapshot new containers are
    # restored from, and the other in every container after that (both in order, once, where
    # snapshots are off). See runtime.py for what goes in which.
    @modal.enter(snap=CONFIG.snapshot)
    def prepare(self) -> None:
        self.service = runtime.prepare(CONFIG.snapshot_kind)

    @modal.enter()
    def start(self) -> None:
        # The backends (and the warm-up), once per container, before its first input.
        runtime.start(self.service, CONFIG.snapshot_kind)

    @modal.exit()
    def stop(self) -> None:
        self.service.stop()

    @modal.method()
    def run(self, job_input: Any) -> dict[str, Any]:
        """One job: what the RunPod handler returns for the same input."""
        job_id = _call_id()
        with ProgressPublisher(progress, job_id) as publish:
            return run_job(self.service, job_id, job_input, publish)

    @modal.method()
    def stream(self, job_input: Any) -> Iterator[dict[str, Any]]:
        """One job as events: `{"progress": payload}` while it runs, then its chunks (the
        result, or a chat's deltas)."""
        job_id = _call_id()
        with ProgressPublisher(progress, job_id) as publish:
            yield from stream_job(self.service, job_id, job_input, publish)


def _call_id() -> str:
    # Modal's call id is the job id callers hold (from /run or FunctionCall.object_id).
    return modal.current_function_call_id() or f"local-{uuid.uuid4()}"


class ModalJobs(Jobs):
    """Jobs as `Worker.run` calls: the call id is the job id, results stay with Modal."""

    def __init__(self, progress: modal.Dict) -> None:
        self.progress = progress

    async def submit(self, payload: Any) -> str:
        call = await Worker().run.spawn.aio(payload)
        return str(call.object_id)

    async def status(self, job_id: str, wait_s: float = 0.0) -> JobStatus | None:
        try:
            result = await modal.FunctionCall.from_id(job_id).get.aio(timeout=wait_s)
        except (modal.exception.NotFoundError, modal.exception.InvalidError, modal.exception.OutputExpiredError):
            return None
        except modal.exception.FunctionTimeoutError:
            return await self._unless_cancelled(job_id, JobStatus.failed(
                {"type": "timeout", "message": f"the Modal call exceeded its {CONFIG.timeout_s} s timeout"},
                "TIMED_OUT"))
        except (TimeoutError, modal.exception.TimeoutError):
            return await self._unless_cancelled(job_id, JobStatus.running(await self.progress.get.aio(job_id)))
        except Exception as exc:
            return await self._unless_cancelled(job_id, JobStatus.failed(
                {"type": "backend", "message": f"the worker's Modal call failed: {type(exc).__name__}: {exc}"}))
        return JobStatus.finished(result)

    async def cancel(self, job_id: str) -> JobStatus | None:
        try:
            await modal.FunctionCall.from_id(job_id).cancel.aio()
        except (modal.exception.NotFoundError, modal.exception.InvalidError):
            return None
        await self.progress.put.aio(_cancel_key(job_id), True)
        return JobStatus("CANCELLED")

    async def _unless_cancelled(self, job_id: str, status: JobStatus) -> JobStatus:
        # Modal reports a cancelled call like a failed or unfinished one; /cancel left a mark.
        return JobStatus("CANCELLED") if await self.progress.get.aio(_cancel_key(job_id)) else status


def _cancel_key(job_id: str) -> str:
    return f"{job_id}/cancelled"


@app.function(image=cpu_image, secrets=_secrets(CONFIG.api_secret, required=("DIFFBOX_API_KEY",)),
              scaledown_window=CONFIG.scaledown_s)
@modal.concurrent(max_inputs=200)
@modal.asgi_app()
def web() -> FastAPI:
    return create_app(ModalJobs(progress), api_key=os.environ.get("DIFFBOX_API_KEY"), max_wait_s=WEB_MAX_WAIT_S)


@app.function(image=cpu_image, volumes={MODELS_DIR: models}, secrets=_secrets(CONFIG.hf_secret),
              timeout=6 * 3600)
def download_models(workflows: str = "all", presets: str = "all", chat_model: str = "", locked: str = "") -> None:
    """`python -m builder download` into the models Volume: sha256 checked against the Hub's,
    recorded in its weights.lock.json; files the lock already records are skipped, so a second
    run completes an interrupted one. `locked`: a committed lock (`workflows/locks/NAME.json`)
    whose commits and bytes are fetched exactly."""
    argv = ["python", "-m", "builder", "download", "--workflows", workflows, "--presets", presets,
            "--dest", MODELS_DIR]
    if locked:
        argv += ["--locked", locked]
    if chat_model:
        argv += ["--chat-model", chat_model]
    try:
        subprocess.run(argv, cwd=SRC, check=True)
    finally:
        # Keep what was fetched even when some files failed.
        models.commit()
