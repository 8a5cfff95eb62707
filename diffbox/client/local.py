"""`--endpoint local`: jobs on a worker started in this process from the DIFFBOX_* settings
(ComfyUI launched as the deployed worker launches it, stopped at exit), through the same
`LocalJobs` that `python -m diffbox serve` serves, without HTTP in between. `make run` uses it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .. import runtime
from ..api.http_api import JobStatus, LocalJobs, stream_envelope
from .envelope import Envelope
from .errors import EndpointError

T = TypeVar("T")


class LocalTransport:
    name = "local"
    max_request_bytes: int | None = None

    def __init__(self) -> None:
        # LocalJobs keeps its jobs as tasks of one event loop: a thread of its own runs it.
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="local-jobs", daemon=True).start()
        self.jobs = LocalJobs(runtime.service())

    def submit(self, payload: dict[str, Any]) -> str:
        return self._call(self.jobs.submit(payload))

    def status(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        return self._found(job_id, self._call(self.jobs.status(job_id))).envelope(job_id)

    def stream(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        found = self._call(self.jobs.stream(job_id))
        if found is None:
            raise EndpointError(f"job {job_id}: not found")
        return stream_envelope(job_id, *found)

    def cancel(self, job_id: str) -> None:
        self._found(job_id, self._call(self.jobs.cancel(job_id)))

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @staticmethod
    def _found(job_id: str, status: JobStatus | None) -> JobStatus:
        if status is None:
            raise EndpointError(f"job {job_id}: not found")
        return status
