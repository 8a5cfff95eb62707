"""One job driven from synchronous code, and where its progress goes for callers elsewhere.

The RunPod handler awaits `Service.run`; other adapters (Modal's class methods) are plain
functions or generators. Modal runs a sync input on the main thread and cancels it by raising
`InputCancellation` there, so the job runs on a thread of its own with its own event loop and
is stopped through `Service.run`'s `stop` event, the way that survives any exception raised
into the waiting thread.

Progress for callers outside the worker (a web route answering `/status/{id}`) goes to a
`ProgressStore` keyed by job id: a dict here, a `modal.Dict` on Modal.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Generator
from typing import Any, Protocol

from .. import logs
from ..progress import Emit
from ..service import Service

log = logs.get("jobs")
# How long closing a job's events waits for the job to stop: Service.run takes up to 120 s
# to get its prompt out of ComfyUI's queue and its files removed after a stop.
STOP_WAIT_S = 130.0


class ProgressStore(Protocol):
    """The part of a mapping (a dict, a `modal.Dict`) that progress needs."""

    def put(self, key: str, value: dict[str, Any]) -> object: ...

    def get(self, key: str, default: None = None) -> Any: ...


class MemoryProgressStore:
    """A `ProgressStore` in this process's memory."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: str, default: None = None) -> dict[str, Any] | None:
        with self._lock:
            return self._data.get(key, default)


class ProgressPublisher:
    """Writes the latest progress payload of one job to a store, from a thread of its own.

    A remote store's write is a network call: made on the job's thread it would hold up
    reading ComfyUI's events, and a failing store would fail the job. Only the newest payload
    is written (one writer, so in `seq` order); older ones still waiting are skipped.
    """

    def __init__(self, store: ProgressStore, key: str) -> None:
        self.store = store
        self.key = key
        self._pending: dict[str, Any] | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name=f"progress-{key}", daemon=True)
        self._thread.start()

    def __call__(self, payload: dict[str, Any]) -> None:
        with self._wake:
            self._pending = payload
            self._wake.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending, then stop."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def __enter__(self) -> ProgressPublisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                payload, self._pending = self._pending, None
                if payload is None:
                    return
            try:
                self.store.put(self.key, payload)
            except Exception as exc:  # progress is best effort; the job's result is what counts
                logs.event(log, "progress not stored", level=30, job_id=self.key, error=type(exc).__name__)


_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def stream_job(service: Service, job_id: str, payload: Any,
               publish: Emit | None = None) -> Generator[dict[str, Any], None, None]:
    """Run one job and yield its events: `{"progress": payload}` while it runs, then the
    chunks of `Service.stream` (a chat's, or any other job's result as the one chunk).
    `publish` gets every progress payload too.
    Closing the iterator early, or an exception raised into the thread waiting on it (a
    cancelled Modal input), stops the job and waits for it to wind down.
    """
    return _events(service, job_id, payload, publish, progress_events=True, chunks=True)


def run_job(service: Service, job_id: str, payload: Any, publish: Emit | None = None) -> dict[str, Any]:
    """`Service.run` from synchronous code, with the same result; stops the job if the
    waiting thread is interrupted (see `stream_job`)."""
    # closing(): an exception raised here must stop the job now, not when the frame is freed.
    with contextlib.closing(_events(service, job_id, payload, publish, progress_events=False, chunks=False)) as events:
        return next(events)


def _events(service: Service, job_id: str, payload: Any, publish: Emit | None, *,
            progress_events: bool, chunks: bool) -> Generator[dict[str, Any], None, None]:
    events: queue.Queue[object] = queue.Queue()
    stop = threading.Event()

    def emit(update: dict[str, Any]) -> None:
        if publish is not None:
            publish(update)
        if progress_events:
            events.put({"progress": update})

    async def produce() -> None:
        if not chunks:
            events.put(await service.run(job_id, payload, emit, stop))
            return
        async for chunk in service.stream(job_id, payload, emit, stop):
            events.put(chunk)

    def work() -> None:
        try:
            asyncio.run(produce())
        except BaseException as exc:
            events.put(_Failed(exc))
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=work, name=f"job-{job_id}", daemon=True)
    try:
        # Inside the try: a cancellation can land while start() still waits for the thread,
        # and the job must be stopped then too.
        thread.start()
        while (item := events.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.exc
            assert isinstance(item, dict)
            yield item
    finally:
        # A no-op when the job has ended; otherwise this is a cancellation.
        stop.set()
        if thread.ident is not None:  # it did start
            thread.join(STOP_WAIT_S)
