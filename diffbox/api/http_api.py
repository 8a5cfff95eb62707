"""RunPod's serverless HTTP API (`/run`, `/runsync`, `/status/{id}`, `/cancel/{id}`, and
`/stream/{id}` where the runner streams) over any job runner, so an app switches between a
RunPod endpoint and another deployment by base URL.

`create_app(jobs)` builds the FastAPI app; `jobs` is where jobs run: `LocalJobs` runs them in
this process on a `Service` (`python -m diffbox serve`), and `modal_app.py` has one that spawns
them on Modal's GPU class.
The envelopes are RunPod's: `{"input": ...}` in; `{"id", "status", "output"}` or
`{"id", "status": "FAILED", "error"}` out, `error` being the job's error object as JSON text,
as a RunPod endpoint running handler.py returns it. While a job runs, `output` on `/status` is its latest
progress payload, as RunPod shows `progress_update`s.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .. import chat
from ..errors import as_text
from ..service import Service

Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
# RunPod's /runsync waits 90 s unless `?wait=` (ms) says otherwise, then answers with the
# job's id and status for the caller to poll /status.
DEFAULT_WAIT_S = 90.0


@dataclass(frozen=True)
class JobStatus:
    status: Status
    output: Any = None
    error: Any = None

    @classmethod
    def finished(cls, result: dict[str, Any] | list[Any]) -> JobStatus:
        """The status of a job that returned `result` (or a streamed job's list of chunks): an
        error result (or last chunk) fails the job, as the runpod SDK does with a handler's
        `{"error": ...}`."""
        if (error := _error_of(result)) is not None:
            return cls.failed(error)
        return cls("COMPLETED", output=result)

    @classmethod
    def failed(cls, error: Any, status: Status = "FAILED") -> JobStatus:
        return cls(status, error=as_text(error))

    @classmethod
    def running(cls, progress: dict[str, Any] | None) -> JobStatus:
        return cls("IN_QUEUE") if progress is None else cls("IN_PROGRESS", output=progress)

    def envelope(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {"id": job_id, "status": self.status}
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


def stream_envelope(job_id: str, status: JobStatus, chunks: list[Any]) -> dict[str, Any]:
    """RunPod's `/stream` answer: `{"id", "status", "stream": [{"output": chunk}, ...]}`."""
    body = {k: v for k, v in status.envelope(job_id).items() if k != "output"}
    return {**body, "stream": [{"output": chunk} for chunk in chunks]}


def _error_of(result: dict[str, Any] | list[Any]) -> Any:
    last = (result[-1] if result else None) if isinstance(result, list) else result
    return last.get("error") if isinstance(last, dict) else None


@dataclass
class _LocalJob:
    stop: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] | None = None
    chunks: list[Any] = field(default_factory=list)
    streamed: int = 0  # how many chunks /stream has handed out
    task: asyncio.Task[dict[str, Any] | list[Any]] = field(init=False)

    def report(self, update: dict[str, Any]) -> None:
        # The service emits from one thread, in `seq` order: the last one is the latest.
        self.progress = update


class Jobs(Protocol):
    async def submit(self, payload: Any) -> str:
        """Queue one job; returns its id."""
        ...

    async def status(self, job_id: str, wait_s: float = 0.0) -> JobStatus | None:
        """The job's status, waiting up to `wait_s` for it to finish; None for an unknown id."""
        ...

    async def cancel(self, job_id: str) -> JobStatus | None:
        ...


@runtime_checkable
class StreamingJobs(Jobs, Protocol):
    async def stream(self, job_id: str) -> tuple[JobStatus, list[Any]] | None:
        """The job's status and the chunks it produced since the last call; None for an unknown id."""
        ...


class LocalJobs:
    """Jobs run on `service` in this process's event loop; the latest `keep` are remembered."""

    def __init__(self, service: Service, keep: int = 1000) -> None:
        self.service = service
        self.keep = keep
        self._jobs: OrderedDict[str, _LocalJob] = OrderedDict()

    async def submit(self, payload: Any) -> str:
        job_id = str(uuid.uuid4())
        job = self._jobs[job_id] = _LocalJob()
        job.task = asyncio.create_task(self._run(job_id, job, payload))
        self._forget_old()
        return job_id

    async def _run(self, job_id: str, job: _LocalJob, payload: Any) -> dict[str, Any] | list[Any]:
        if chat.is_chat(payload) and isinstance(payload, dict) and payload.get("stream") is True:
            # A streamed chat's result is its chunks, as RunPod aggregates a generator handler's.
            async for chunk in self.service.stream(job_id, payload, job.report, job.stop):
                job.chunks.append(chunk)
            return list(job.chunks)
        result = await self.service.run(job_id, payload, job.report, job.stop)
        job.chunks.append(result)
        return result

    async def status(self, job_id: str, wait_s: float = 0.0) -> JobStatus | None:
        if (job := self._jobs.get(job_id)) is None:
            return None
        if wait_s > 0 and not job.task.done():
            await asyncio.wait({job.task}, timeout=wait_s)
        if not job.task.done():
            return JobStatus.running(job.progress)
        result = job.task.result()
        error = _error_of(result)
        if job.stop.is_set() and isinstance(error, dict) and error.get("type") == "cancelled":
            return JobStatus("CANCELLED")
        return JobStatus.finished(result)

    async def stream(self, job_id: str) -> tuple[JobStatus, list[Any]] | None:
        # The status first: once it is final, every chunk is there to hand out.
        if (status := await self.status(job_id)) is None:
            return None
        job = self._jobs[job_id]
        chunks, job.streamed = job.chunks[job.streamed:], len(job.chunks)
        return status, chunks

    async def cancel(self, job_id: str) -> JobStatus | None:
        if (job := self._jobs.get(job_id)) is None:
            return None
        if not job.task.done():
            job.stop.set()
        return await self.status(job_id)

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.task.done()]
        for job_id in finished[: max(len(self._jobs) - self.keep, 0)]:
            del self._jobs[job_id]


def create_app(jobs: Jobs, api_key: str | None = None, max_wait_s: float = 300.0) -> FastAPI:
    """RunPod's endpoint API over `jobs`, at `/run` and under any `/{endpoint_id}/run`: the
    runpod SDK builds its URLs as `{endpoint_url_base}/{endpoint_id}/...`.

    `api_key`, when set, is required as `Authorization: Bearer <key>` (RunPod's scheme; the bare
    key, which the runpod SDK sends, is accepted too). `max_wait_s` caps `/runsync`'s `?wait=`:
    a platform whose proxy cuts requests sooner (Modal: 150 s) must answer before it does.
    """
    app = FastAPI(title="diffbox", description=__doc__, docs_url=None, redoc_url=None)
    routes = APIRouter()

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if api_key is not None and not _authorized(request.headers.get("authorization"), api_key):
            return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)"}, 401)
        return await call_next(request)

    @app.exception_handler(_BadRequest)
    async def bad_request(_: Request, exc: _BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 400)

    @routes.post("/run")
    async def run(request: Request) -> JSONResponse:
        job_id = await jobs.submit(await _job_input(request))
        return JSONResponse({"id": job_id, "status": "IN_QUEUE"})

    @routes.post("/runsync")
    async def runsync(request: Request, wait: int | None = None) -> JSONResponse:
        payload = await _job_input(request)
        wait_s = min(DEFAULT_WAIT_S if wait is None else max(wait, 0) / 1000, max_wait_s)
        job_id = await jobs.submit(payload)
        status = await jobs.status(job_id, wait_s)
        return JSONResponse((status or JobStatus("IN_QUEUE")).envelope(job_id))

    @routes.api_route("/status/{job_id}", methods=["GET", "POST"])
    async def status(job_id: str) -> JSONResponse:
        return _answer(job_id, await jobs.status(job_id))

    @routes.post("/cancel/{job_id}")
    async def cancel(job_id: str) -> JSONResponse:
        return _answer(job_id, await jobs.cancel(job_id))

    if isinstance(jobs, StreamingJobs):
        streaming = jobs

        @routes.api_route("/stream/{job_id}", methods=["GET", "POST"])
        async def stream(job_id: str) -> JSONResponse:
            """The chunks since the last call (a plain job's one chunk, its result, comes when
            it is done)."""
            if (found := await streaming.stream(job_id)) is None:
                return _answer(job_id, None)
            return JSONResponse(stream_envelope(job_id, *found))

    app.include_router(routes)
    app.include_router(routes, prefix="/{endpoint_id}")
    return app


class _BadRequest(Exception):
    pass


def _authorized(header: str | None, api_key: str) -> bool:
    given = (header or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


async def _job_input(request: Request) -> Any:
    """The `input` of a RunPod request body."""
    try:
        body = await request.json()
    except ValueError:
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict) or "input" not in body:
        raise _BadRequest('input: required; the body is {"input": {...}}')
    # RunPod's other envelope fields (webhook, policy, s3Config) are not implemented: refusing
    # them is better than a webhook that is never called or outputs in the wrong bucket.
    if unknown := sorted(set(body) - {"input"}):
        raise _BadRequest(f"{', '.join(unknown)}: not supported by this endpoint")
    return body["input"]


def _answer(job_id: str, status: JobStatus | None) -> JSONResponse:
    if status is None:
        return JSONResponse({"id": job_id, "error": "job not found (unknown id, or its result has expired)"}, 404)
    return JSONResponse(status.envelope(job_id))
