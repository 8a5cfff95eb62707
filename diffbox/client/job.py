"""One job on an endpoint: its progress, its result, its chunks, cancelling it, its outputs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .download import outputs_of, save_outputs
from .envelope import FINAL_STATUSES, Envelope
from .errors import EndpointError, JobCancelled, JobFailed, NotSupported
from .transports import Transport


class Job:
    """A submitted job. Its methods poll the endpoint every `poll_s` seconds; `timeout`
    (seconds, None for no bound) raises TimeoutError when it runs out, and the job goes on."""

    def __init__(self, transport: Transport, job_id: str, poll_s: float = 1.0) -> None:
        self.transport = transport
        self.id = job_id
        self.poll_s = poll_s
        self.status = "IN_QUEUE"
        self.last_progress: dict[str, Any] | None = None
        self._seq = -1
        self._final: Envelope | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status!r}, via {self.transport.name})"

    @property
    def done(self) -> bool:
        return self._final is not None

    def progress(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The progress payloads until the job ends, each newer than the last (by `seq`):
        updates are sent from separate threads and can arrive out of order, and polling sees
        one payload more than once. The runpod SDK's local API server shows none (it runs the
        job inside the one /status request that asks for it)."""
        deadline = _deadline(timeout)
        while self._final is None:
            envelope = self.transport.status(self.id, _remaining(deadline))
            if (update := self._absorb(envelope)) is not None:
                yield update
            if self._final is None:
                self._pause(deadline)

    def wait(self, timeout: float | None = None) -> Envelope:
        """The job's final envelope (whatever its status)."""
        for _ in self.progress(timeout):
            pass
        assert self._final is not None
        return self._final

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The job's result; raises JobFailed (JobCancelled) with the worker's error.

        An endpoint that serves chat returns the list of a job's chunks (a generator handler
        with `return_aggregate_stream`): a chat's are joined into the plain result
        (`{"text", "finish_reason", "usage"}`), any other job's one chunk is its result.
        """
        return outcome(self.wait(timeout), self.id)

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """The job's chunks as they come (a chat's `{"delta"}`s, for a request with
        `stream: true`); where the endpoint cannot stream, the result as one chunk. The runpod
        SDK's local API server gives them all at once, at the end."""
        deadline = _deadline(timeout)
        chunks: list[Any] = []
        while self._final is None:
            try:
                envelope = self.transport.stream(self.id, _remaining(deadline))
            except NotSupported:
                yield self.result(_remaining(deadline))
                return
            status = envelope.get("status")
            for item in envelope.get("stream") or []:
                chunk = item.get("output") if isinstance(item, dict) else item
                if isinstance(chunk, dict) and "error" in chunk:
                    raise JobFailed.from_error(chunk["error"], self.id)
                chunks.append(chunk)
                yield chunk
            if status == "COMPLETED" and not chunks:
                # Nothing streamed (a plain handler's job): the result is on /status.
                yield self.result(_remaining(deadline))
                return
            if status in FINAL_STATUSES:
                # The local server forgets a job once streamed: keep what came for result().
                self._absorb({**envelope, "output": chunks} if status == "COMPLETED" else envelope)
                outcome(envelope, self.id)  # raises for a failed job
                return
            self._pause(deadline)

    def cancel(self) -> None:
        """Ask the endpoint to stop the job (result() then raises JobCancelled); raises
        NotSupported where the endpoint cannot (the runpod SDK's local API server)."""
        self.transport.cancel(self.id)

    def download(self, directory: str | Path, timeout: float | None = None) -> list[Path]:
        """Save the result's outputs into `directory`, fetched from their URLs or decoded
        inline; each is checked against its `sha256` (ChecksumMismatch, and the file is not
        kept, when it differs)."""
        return save_outputs(outputs_of(self.result(timeout)), Path(directory))

    def _absorb(self, envelope: Envelope) -> dict[str, Any] | None:
        """Take one status envelope in; the progress payload it brings, if it is new."""
        status = envelope.get("status")
        if not isinstance(status, str):
            raise EndpointError(f"job {self.id}: an answer without a status: {envelope!r:.300}")
        self.status = status
        if status in FINAL_STATUSES:
            self._final = envelope
            return None
        update = envelope.get("output")
        if isinstance(update, dict) and isinstance(update.get("seq"), int) and update["seq"] > self._seq:
            self._seq = update["seq"]
            self.last_progress = update
            return update
        return None

    def _pause(self, deadline: float | None) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"job {self.id} is still {self.status}")
        time.sleep(self.poll_s if remaining is None else min(self.poll_s, remaining))


def outcome(envelope: Envelope, job_id: str | None = None) -> dict[str, Any]:
    """The result a final envelope carries; raises JobFailed for any other ending."""
    status = envelope.get("status")
    if status == "COMPLETED":
        return _unwrap(envelope.get("output"), job_id)
    if status == "CANCELLED":
        raise JobCancelled("cancelled", "job cancelled", job_id=job_id)
    if status == "TIMED_OUT" and not envelope.get("error"):
        raise JobFailed("timeout", "the endpoint's execution timeout ended the job", job_id=job_id)
    raise JobFailed.from_error(envelope.get("error") or f"job ended {status} without an error", job_id)


def _unwrap(output: Any, job_id: str | None) -> dict[str, Any]:
    if isinstance(output, list):
        return _joined(output, job_id)
    if isinstance(output, dict):
        if "error" in output:
            raise JobFailed.from_error(output["error"], job_id)
        return output
    return {"output": output}


def _joined(chunks: list[Any], job_id: str | None) -> dict[str, Any]:
    if chunks and isinstance(chunks[-1], dict) and "error" in chunks[-1]:
        raise JobFailed.from_error(chunks[-1]["error"], job_id)
    if not all(isinstance(c, dict) for c in chunks):
        return {"chunks": chunks}
    if len(chunks) == 1 and "delta" not in chunks[0]:
        return dict(chunks[0])
    if chunks and all("delta" in c for c in chunks):
        # The last chunk adds finish_reason and usage: together, the plain result's fields.
        return {"text": "".join(str(c["delta"]) for c in chunks),
                **{k: v for k, v in chunks[-1].items() if k != "delta"}}
    return {"chunks": chunks}


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    """What is left of `deadline`, as a request's timeout (never zero: that means none)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)
