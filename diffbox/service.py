"""One job from request to result, whatever the platform: validate -> plan -> run -> store.

The adapters (`handler.py` for RunPod, `modal_app.py` for Modal) hand a job id, its input
and a progress callback to `Service.run` and return what it returns, or iterate
`Service.stream` (generator handlers: chat chunks). Blocking work (HTTP, WebSocket, file
I/O) runs in a thread so the event loop stays free: the RunPod SDK stops a job by cancelling
its asyncio task, and that only reaches a handler that awaits. Chat jobs (chat.py) await
vLLM directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from . import chat, logs, prefetch, warmup
from .backends.comfyui import FileRef, output_files
from .backends.comfyui_inputs import HeldInputs, SharedInputs
from .backends.comfyui_job import Outcome, PromptRun, lost
from .backends.comfyui_server import ComfyServer
from .backends.vllm import VllmServer
from .config import Settings
from .deferred import Deferred
from .errors import JobError, backend, validation
from .inputs import urls
from .inputs.media import InputImage, decode_image
from .loras import unmatched
from .memory import release_free_memory
from .progress import STOPPED, Emit, ProgressTracker
from .schemas import OutputOptions
from .storage.stores import OutputUploads, choose_store, object_key
from .workflows import RAW, Workflow, check_models, parse
from .workflows.base import JOB_FOLDER, JobContext, Plan
from .workflows.loras import bind
from .workflows.raw import check_allowed

if TYPE_CHECKING:
    from .loras.fetch import JobLoras
    from .storage.s3 import S3Store

log = logs.get("service")
CLEANUP_DELAY_S = 0.05


def _no_progress(_: dict[str, Any]) -> None:
    return None


def _s3_store(settings: Settings) -> S3Store | None:
    if settings.s3 is None:
        return None
    from .storage.s3 import S3Store  # here: boto3 is about 6 MB resident, its S3 client 13 more

    return S3Store(settings.s3)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.comfy = ComfyServer(settings) if "comfyui" in settings.backends else None
        self.comfy_inputs = (SharedInputs(JOB_FOLDER, self.comfy.input_dir, self.comfy.client.upload_image)
                             if self.comfy is not None else None)
        self.vllm = VllmServer(settings) if "vllm" in settings.backends else None
        self.s3 = _s3_store(settings)
        self.url_policy = urls.UrlPolicy(allow_private=settings.allow_private_urls)
        self.lora_verdicts = unmatched.Verdicts()
        self._warmup_timings: dict[str, float] = {}
        self._prefetch: prefetch.Prefetch | None = None
        self.after_results = Deferred(CLEANUP_DELAY_S)

    def start_prefetch(self, warmed: bool = False) -> None:
        """Start reading the weights the first job will need into memory (prefetch.py); returns
        at once. Before ComfyUI starts, so that the reads overlap its start. `warmed`: the
        warm-up's weights are loaded already (restored from a GPU snapshot taken after it)."""
        entries = self.settings.prefetch_entries()
        if warmed:
            entries = [entry for entry in entries if entry not in self.settings.warmup]
        if self.comfy is not None and self._prefetch is None:
            self._prefetch = prefetch.start(self.settings, entries)

    def start(self) -> None:
        """Cold start: launch every configured backend without waiting for any."""
        if self.comfy is not None:
            self.comfy.supervisor.start()
        if self.vllm is not None:
            self.vllm.supervisor.start()

    def warm_up(self) -> None:
        """Run DIFFBOX_WARMUP's requests (see warmup.py); blocks until they are done."""
        self._warmup_timings = warmup.warm_up(
            self.settings.warmup, self.settings.serves,
            lambda job_id, payload: self._run_blocking(job_id, payload, _no_progress, threading.Event()))

    def restored(self, settings: Settings) -> None:
        """This container's own settings and storage client, after a memory snapshot's restore
        (or at once where there is none): credentials read now, never kept in a snapshot."""
        self.settings = settings
        self.s3 = _s3_store(settings)
        # A warm-up run before the snapshot cost this container nothing: nothing to report.
        self._warmup_timings = {}

    def drop_connections(self) -> None:
        """Close the pooled connections to the backends (a snapshot cannot keep them); the
        next request opens new ones."""
        if self.comfy is not None:
            self.comfy.client.http.close()
            self.comfy.sockets.close()

    def stop(self) -> None:
        self.after_results.flush()  # while the backends still answer
        if self._prefetch is not None:
            self._prefetch.stop()
        if self.comfy is not None:
            self.comfy.supervisor.stop()
        if self.vllm is not None:
            self.vllm.supervisor.stop()

    async def run(self, job_id: str, payload: Any, emit: Emit = _no_progress,
                  stop: threading.Event | None = None) -> dict[str, Any]:
        """Run one job; failures come back as `{"error": {...}}`, never as exceptions.

        `stop` lets a platform cancel without cancelling the task (the result is then an
        error of type "cancelled"); cancelling the task also stops the job, cleans up, and
        re-raises.
        """
        if chat.is_chat(payload):
            return await chat.result(self.settings, self.vllm, job_id, payload, stop)
        stop = stop or threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self._run_blocking, job_id, payload, emit, stop))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            # Wait for our prompt to be dequeued or interrupted and the files removed.
            await asyncio.wait({task}, timeout=120)
            raise

    async def stream(self, job_id: str, payload: Any, emit: Emit = _no_progress,
                     stop: threading.Event | None = None) -> AsyncIterator[Any]:
        """Run one job as a generator handler's chunks: a chat's (streamed when it asks), or
        any other job's result as the one chunk. A failure is the last chunk, `{"error": ...}`."""
        if chat.is_chat(payload):
            async for chunk in chat.stream(self.settings, self.vllm, job_id, payload, stop):
                yield chunk
        else:
            yield await self.run(job_id, payload, emit, stop)

    def _run_blocking(self, job_id: str, payload: Any, emit: Emit, stop: threading.Event) -> dict[str, Any]:
        t0 = time.monotonic()
        job = _Job(self, job_id, emit, stop, t0)
        succeeded = False
        try:
            result = job.run(payload)
            succeeded = True
            # The first job after a warm-up reports what the warm-up cost.
            warmed, self._warmup_timings = self._warmup_timings, {}
            if warmed:
                result.setdefault("timings", {}).update(warmed)
            logs.event(log, "job done", job_id=job_id, workflow=job.workflow_name, total_s=logs.since(t0))
            return result
        except JobError as err:
            logs.event(log, "job failed", job_id=job_id, workflow=job.workflow_name,
                       error_type=err.type, error=err.message, total_s=logs.since(t0))
            if err.type in STOPPED:
                # A stopped job's last update says why it stopped (a caller may keep only the last).
                job.progress.stage(err.type)
            return err.to_dict()
        finally:
            job.clean_up(later=succeeded)


class _Job:
    """State of one ComfyUI job while it runs (one per job, used from one thread)."""

    def __init__(self, service: Service, job_id: str, emit: Emit, stop: threading.Event, t0: float) -> None:
        self.service = service
        self.settings = service.settings
        self.ctx = JobContext(_safe_job_id(job_id), uuid.uuid4().hex[:8])
        if service.comfy_inputs is not None:
            self.ctx = dataclasses.replace(self.ctx, input_folder=service.comfy_inputs.folder)
        self.stop = stop
        self.t0 = t0
        self.deadline = t0 + self.settings.job_timeout_s
        self.progress = ProgressTracker(emit)
        self.workflow_name = "unknown"
        self.dir = self.settings.work_dir / self.ctx.job_id
        self.timings: dict[str, float] = {}
        self.options: OutputOptions | None = None
        self.plan: Plan | None = None
        self.uploads: OutputUploads | None = None
        self.inputs: HeldInputs | None = None
        self.prompt_run: PromptRun | None = None
        self.abort = threading.Event()
        self.loras: JobLoras | None = None
        self.unmatched: dict[str, tuple[int, int]] = {}  # LoRA comfy name -> (tensors unmatched, tensors)

    def run(self, payload: Any) -> dict[str, Any]:
        workflow, request = parse(payload)
        self.workflow_name = workflow.name
        if not self.settings.serves(workflow.name):
            raise validation(f"workflow: {workflow.name!r} is not served by this endpoint")
        comfy = self.service.comfy
        if comfy is None:
            raise validation(f"workflow: {workflow.name!r} needs ComfyUI, which this endpoint does not run")
        if workflow is RAW and self.settings.raw_node_allowlist is not None:
            check_allowed(request.workflow, self.settings.raw_node_allowlist)  # type: ignore[attr-defined]
        self.options = getattr(request, "output", None)
        store = choose_store(self.options and self.options.store, self.service.s3,
                             int(self.settings.max_inline_mb * 1e6))
        self.progress.stage("inputs")
        plan = self.plan = workflow.plan(request, self.ctx, self._load_image)
        check_models(workflow, request, self.settings.models_dir)
        self.uploads = OutputUploads(store, on_failure=self.abort.set)
        self.timings["inputs_s"] = logs.since(self.t0)
        self._fetch_loras(request, plan)
        self.progress.stage("starting")
        comfy.supervisor.ensure_ready(self.settings.startup_timeout_s, self.stop.is_set)
        comfy.reap()  # before queuing: our prompt must not wait behind an earlier job's
        try:
            assert self.service.comfy_inputs is not None
            self.inputs = self.service.comfy_inputs.hold([(upload.name, upload.data) for upload in plan.uploads])
        except (requests.RequestException, ValueError) as exc:
            lost(comfy.supervisor, exc)
        self.progress.set_graph(plan.graph, plan.node_clip, plan.clips)
        self.progress.stage("queued")
        outcome = self._execute(comfy, plan)
        return self._result(workflow, request, plan, outcome)

    def _fetch_loras(self, request: Any, plan: Plan) -> None:
        """The request's own LoRAs into the cache (pinned until the job ends), named in the graph."""
        entries = getattr(request, "loras", None)
        if not entries:
            return
        self.progress.stage("downloading")
        t0 = time.monotonic()
        # Imported here: the LoRA sources (huggingface_hub, httpx) stay out of a worker's memory
        # until a request names a LoRA.
        from .loras.fetch import fetcher_for

        fetcher = fetcher_for(self.settings, self.service.url_policy, self.service.s3)
        self.loras = fetcher.fetch(entries, self.progress.downloaded, self.stop.is_set,
                                   lambda: self.deadline - time.monotonic())
        bind(plan.graph, plan.lora_nodes, [f.comfy_name for f in self.loras.files])
        self.timings["download_s"] = logs.since(t0)

    def _load_image(self, value: str, field: str) -> InputImage:
        return decode_image(value, field, int(self.settings.max_input_mb * 1e6), self._fetch)

    def _fetch(self, url: str, field: str, max_bytes: int) -> bytes:
        if not url.startswith("s3://"):
            return urls.fetch(url, field, max_bytes, self.service.url_policy, self.stop.is_set)
        if self.service.s3 is None:
            raise validation(f"{field}: s3:// inputs need S3 storage, which this endpoint does not configure")
        return self.service.s3.fetch(url, field, max_bytes)

    def _execute(self, comfy: ComfyServer, plan: Plan) -> Outcome:
        submitted = time.monotonic()
        run = self.prompt_run = PromptRun(comfy.client, comfy.supervisor, self.stop, self.deadline,
                                          self.progress.on_message, self._on_output, self.abort, comfy.sockets)
        log_mark = unmatched.last_entry(comfy.client.log_entries()) if self.loras is not None else None
        outcome = run.run(plan.graph)
        ended = time.monotonic()
        if self.loras is not None and outcome.status == "success":
            self._judge_loras(comfy, plan, outcome, log_mark)
        started = outcome.started_at or ended
        self.timings["queue_s"] = round(started - submitted, 3)
        self.timings["inference_s"] = round(ended - started, 3)
        if outcome.exec_start_ms is not None and outcome.exec_end_ms is not None:
            self.timings["comfyui_exec_s"] = round((outcome.exec_end_ms - outcome.exec_start_ms) / 1000, 3)
        if outcome.status == "error":
            raise _execution_error(outcome.error or {})
        if outcome.status == "interrupted":
            if run.stop_reason == "aborted":
                self._store()  # raises the failed output's own error: why the prompt was stopped
            try:
                partial = self._store(announce=False)
            except JobError:
                partial = []  # why the job stopped matters more than a lost partial output
            details = {"outputs": partial} if partial else None
            if run.stop_reason == "timeout":
                raise JobError("timeout", f"job exceeded {self.settings.job_timeout_s:g} s "
                               "(DIFFBOX_JOB_TIMEOUT_S) and was interrupted", details)
            if run.stop_reason == "cancelled":
                raise JobError("cancelled", "job cancelled", details)
            raise backend("ComfyUI interrupted the prompt (an interrupt not sent by this job)", details)
        return outcome

    def _judge_loras(self, comfy: ComfyServer, plan: Plan, outcome: Outcome, log_mark: tuple[str, str] | None) -> None:
        """Which of the request's LoRAs ComfyUI could not fully map onto the model (a result warning)."""
        assert self.loras is not None
        names = [f.comfy_name for f in self.loras.files]
        loaders = {node: names[index] for node, index in plan.lora_nodes.items()}
        files = {name: self.settings.models_dir / "loras" / name for name in names}
        not_loaded = unmatched.not_loaded_since(comfy.client.log_entries(), log_mark)
        self.unmatched = self.service.lora_verdicts.judge(
            plan.graph, loaders, files, set(plan.graph) - outcome.cached, not_loaded)

    def _on_output(self, node: str, output: dict[str, Any]) -> None:
        """Start storing each file as soon as ComfyUI reports it, not after the whole job."""
        assert self.uploads is not None and self.plan is not None
        include_temp = bool(self.options and self.options.include_temp)
        prefix = self.settings.s3.prefix if self.settings.s3 else ""
        if self.options and self.options.prefix is not None:
            prefix = self.options.prefix
        for ref in output_files(node, output):
            if ref.type == "output" or (include_temp and ref.type == "temp"):
                fields: dict[str, Any] = {"node": ref.node}
                if ref.node in self.plan.partial_nodes:
                    fields["clip"] = self.plan.partial_nodes[ref.node]
                # The file's path inside the job's folder, so sub-folders a graph names stay apart.
                name = f"{ref.subfolder.removeprefix(self.ctx.subfolder).strip('/')}/{ref.filename}"
                self.uploads.add(object_key(prefix, self.ctx.job_id, name),
                                 functools.partial(self._locate, ref), ref.animated, fields)

    def _locate(self, ref: FileRef) -> Path:
        comfy = self.service.comfy
        assert comfy is not None
        path = comfy.local_path(ref)
        if path is None:
            # Not on this disk: a download, named uniquely within the job's folder.
            dest = self.dir / uuid.uuid4().hex[:8] / Path(ref.filename).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                path = comfy.client.download(ref, dest)
            except requests.RequestException as exc:
                lost(comfy.supervisor, exc)
        return path

    def _result(self, workflow: Workflow, request: Any, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        stored = self._store()
        self.timings["total_s"] = logs.since(self.t0)
        if workflow.name == "raw":
            # The official RunPod ComfyUI worker's shape, each entry extended with our fields.
            images = [{"type": "s3_url" if "url" in o else "base64",
                       **o, "data": o.get("data") or o.get("url")} for o in stored]
            return {"images": images, **plan.settings, "timings": self.timings}
        result = {"workflow": workflow.name, **plan.settings, "outputs": stored, "timings": self.timings}
        if self.loras is not None:
            result["loras"] = [f.describe(e) for f, e in zip(self.loras.files, request.loras, strict=True)]
            warnings = [unmatched.warning(i, f.source, *self.unmatched[f.comfy_name])
                        for i, f in enumerate(self.loras.files)
                        if self.unmatched.get(f.comfy_name, (0, 0))[0] > 0]
            if warnings:
                result["warnings"] = warnings
                log.warning("LoRA tensors ignored", extra={"job_id": self.ctx.job_id, "warnings": len(warnings)})
        return result

    def _store(self, announce: bool = True) -> list[dict[str, Any]]:
        """Wait for every output's upload, in report order (most are done by now). A stopped
        job's partial outputs are stored without `announce`: its percent stays where it stopped."""
        assert self.uploads is not None
        if announce:
            self.progress.stage("uploading")
        t0 = time.monotonic()
        stored = self.uploads.results()
        self.timings["upload_s"] = logs.since(t0)
        return stored

    def clean_up(self, later: bool = False) -> None:
        """Remove everything this job left, whatever the outcome (a warm worker's disk must
        not fill up, and ComfyUI's in-memory history must not grow). `later`: ComfyUI's side
        (its files of the job, its history) goes on a thread of its own, so a result does not
        wait for it: file removal and a request cost a small job more than its own handling."""
        if self.uploads is not None:
            self.uploads.close()  # no upload may still be reading a file removed below
        shutil.rmtree(self.dir, ignore_errors=True)  # named after the job id, which a caller may reuse
        if self.loras is not None and (self.prompt_run is None or self.prompt_run.finished):
            # The cache may evict them again once ComfyUI is done with them: now, unless the
            # prompt may still run (then once it has left ComfyUI, see _release_comfyui).
            self.loras.release()
        if later:
            # A moment later: the result's way out (the platform's event loop) needs the GIL
            # too, and a clean-up competing for it would delay the result by milliseconds.
            self.service.after_results.later(self._release_comfyui, f"diffbox-cleanup-{self.ctx.job_id}")
        else:
            self._release_comfyui()

    def _release_comfyui(self) -> None:
        comfy = self.service.comfy
        if comfy is None:
            return
        if self.inputs is not None:
            self.inputs.release()
        comfy.remove_job_files(self.ctx.subfolder)
        run = self.prompt_run
        if run is None:
            return
        if not run.finished:
            # The next job stops it and cleans up after it, its LoRAs' pins included.
            comfy.disown(run.prompt_id, self.ctx.subfolder, self.loras.release if self.loras else None)
            return
        try:
            comfy.client.forget(run.prompt_id)
            comfy.reap()  # ComfyUI answers again: whatever earlier jobs left can go now
        except Exception as exc:  # clean-up must never mask the job's own result
            logs.event(log, "could not drop prompt from ComfyUI history", level=30,
                       prompt_id=run.prompt_id, error=type(exc).__name__)
            comfy.disown(run.prompt_id, self.ctx.subfolder)  # the next job tries again
        release_free_memory()


def _execution_error(error: dict[str, Any]) -> JobError:
    node_id, node_type = error.get("node_id"), error.get("node_type")
    exc_type, exc_message = error.get("exception_type"), str(error.get("exception_message", "")).strip()
    return backend(
        f"node {node_id} ({node_type}) failed: {exc_type}: {exc_message}",
        {"node_id": node_id, "class_type": node_type, "exception_type": exc_type,
         "exception_message": exc_message, "traceback": error.get("traceback")},
    )


def _safe_job_id(job_id: str) -> str:
    # Job ids become folder names: keep them to a safe alphabet whatever the platform sends.
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(job_id))[:128]
    return cleaned or "job"

