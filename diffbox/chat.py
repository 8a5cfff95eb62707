"""One chat job: validate, wait for vLLM, call it, and shape its answer (workflows/chat.py).

Chat runs on the event loop, not in a thread as ComfyUI jobs do. Its HTTP client is aiohttp
(already installed as the runpod SDK's own): cancelling the job's task interrupts the read
at once and closing the response closes the connection, which is what makes vLLM stop
generating; a thread blocked in `requests` cannot be interrupted that way, and concurrent
chats (vLLM batches them) would each hold a thread for their whole length.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import aiohttp

from . import logs
from .backends.vllm import VllmServer, error_of, sse_data
from .config import Settings
from .errors import JobError, backend, validation
from .workflows import parse, workflow_name
from .workflows.chat import ChatRequest, Shaper, VllmCall, VllmWorkerRequest, call_for

log = logs.get("chat")
# How long a broken connection waits for the server's exit to be reported (its exit code
# and log tail make a better error than the connection's).
EXIT_WAIT_S = 3.0
STOP_POLL_S = 0.1


def is_chat(payload: Any) -> bool:
    try:
        return isinstance(payload, dict) and workflow_name(payload) == "chat"
    except JobError:
        return False


async def stream(settings: Settings, server: VllmServer | None, job_id: str, payload: Any,
                 stop: threading.Event | None = None, streamed: bool = True) -> AsyncIterator[Any]:
    """The chunks of one chat job; a failure ends it with one `{"error": ...}` chunk.

    `streamed` False asks vLLM for the whole answer, which is then the one chunk.
    """
    job = _ChatJob(settings, server, stop)
    t0 = time.monotonic()
    chunks = 0
    first_s: float | None = None
    try:
        async for chunk in job.chunks(payload, streamed):
            if first_s is None:
                first_s = logs.since(t0)
            chunks += 1
            yield chunk
    except JobError as err:
        logs.event(log, "job failed", job_id=job_id, workflow="chat", error_type=err.type, error=err.message,
                   chunks=chunks, total_s=logs.since(t0))
        yield err.to_dict()
        return
    except (asyncio.CancelledError, GeneratorExit):
        logs.event(log, "job cancelled", job_id=job_id, workflow="chat", chunks=chunks, total_s=logs.since(t0))
        raise
    logs.event(log, "job done", job_id=job_id, workflow="chat", chunks=chunks, first_chunk_s=first_s,
               total_s=logs.since(t0))


async def result(settings: Settings, server: VllmServer | None, job_id: str, payload: Any,
                 stop: threading.Event | None = None) -> dict[str, Any]:
    """One chat job's whole result (the request's `stream` is not used: there is one value)."""
    answer: dict[str, Any] = {}
    async for chunk in stream(settings, server, job_id, payload, stop, streamed=False):
        answer = chunk
    return answer


class _ChatJob:
    def __init__(self, settings: Settings, server: VllmServer | None, stop: threading.Event | None) -> None:
        self.settings = settings
        self.server = server
        self.stop = stop
        self.session: aiohttp.ClientSession | None = None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def chunks(self, payload: Any, streamed: bool) -> AsyncIterator[Any]:
        _, request = parse(payload)
        if not self.settings.serves("chat"):
            raise validation("workflow: 'chat' is not served by this endpoint")
        if self.server is None:
            raise validation("workflow: 'chat' needs vLLM, which this endpoint does not run")
        assert isinstance(request, ChatRequest | VllmWorkerRequest)
        call = call_for(request, streamed)
        await self._ready(self.server)
        if self.stopped():
            raise JobError("cancelled", "job cancelled")
        watcher = asyncio.ensure_future(self._watch()) if self.stop is not None else None
        try:
            async for chunk in self._call(self.server, call):
                yield chunk
        except TimeoutError:
            if self.stopped():
                raise JobError("cancelled", "job cancelled") from None
            raise JobError("timeout", f"job exceeded {self.settings.job_timeout_s:g} s "
                           "(DIFFBOX_JOB_TIMEOUT_S)") from None
        except aiohttp.ClientError as exc:
            if self.stopped():
                raise JobError("cancelled", "job cancelled") from None
            await self._lost(self.server, exc)
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _ready(self, server: VllmServer) -> None:
        # The wait runs in a thread; `gone` ends it should this job's task be cancelled.
        gone = threading.Event()
        try:
            await asyncio.to_thread(server.supervisor.ensure_ready, self.settings.startup_timeout_s,
                                    lambda: self.stopped() or gone.is_set())
        finally:
            gone.set()

    async def _call(self, server: VllmServer, call: VllmCall) -> AsyncIterator[Any]:
        body = call.body
        if body is not None and call.needs_model and "model" not in body:
            body = {**body, "model": server.model}
        shaper = Shaper(call.shape)
        # A session per job: jobs may run on different event loops (Modal runs each in its own),
        # and a loopback connection costs well under a millisecond.
        timeout = aiohttp.ClientTimeout(total=self.settings.job_timeout_s, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as self.session, \
                self.session.request(call.method, server.url + call.route, json=body) as response:
            if response.status >= 400:
                raise _refused(response.status, *await error_of(response))
            if not call.stream:
                yield shaper.whole(await response.json(content_type=None))
                return
            async for data in sse_data(response.content.iter_any()):
                if self.stopped():
                    raise JobError("cancelled", "job cancelled")
                if (chunk := shaper.chunk(data)) is not None:
                    yield chunk
                # Reading data already buffered never waits: without this, a fast stream would
                # hold the event loop (other jobs' chunks, cancellation) until vLLM paused.
                await asyncio.sleep(0)
            if (last := shaper.end()) is not None:
                yield last

    async def _watch(self) -> None:
        """Close the request when the caller sets `stop`: vLLM then stops generating. The
        session, not the response: a whole answer's response only comes when it is done."""
        assert self.stop is not None
        while not self.stop.is_set():
            await asyncio.sleep(STOP_POLL_S)
        if self.session is not None:
            await self.session.close()

    async def _lost(self, server: VllmServer, exc: Exception) -> NoReturn:
        process = server.supervisor.process
        if process is not None:
            deadline = time.monotonic() + EXIT_WAIT_S
            while process.returncode() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            server.supervisor.raise_if_exited("during the job")
        server.supervisor.mark_unready()
        raise backend(f"lost the connection to vLLM: {type(exc).__name__}: {exc}")


def _refused(status: int, message: str, error: Any) -> JobError:
    """vLLM's refusal of a request: the caller's mistake (4xx) names the field when vLLM does."""
    details = {"status": status, "vllm_error": error}
    if 400 <= status < 500:
        param = error.get("param") if isinstance(error, dict) else None
        field = str(param).removeprefix("body.") if param else None
        return validation(f"{field}: {message}" if field else f"vLLM refused the request: {message}", details)
    return backend(f"vLLM answered {status}: {message}", details)
