"""What a caller of an endpoint can catch: the worker's own errors, and the endpoint's."""

from __future__ import annotations

import json
from typing import Any


class ClientError(Exception):
    """Base of everything `diffbox.client` raises on purpose."""


class JobFailed(ClientError):
    """A job that ended in an error: the worker's `{"type", "message", "details"}`.

    `type` is one of the result contract's (validation, backend, timeout, cancelled, storage),
    or "endpoint" for a failure the platform reported in words of its own.
    """

    def __init__(self, type: str, message: str, details: Any = None, job_id: str | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.details = details
        self.job_id = job_id

    @classmethod
    def from_error(cls, error: Any, job_id: str | None = None) -> JobFailed:
        """From a job's `error`: the worker's object, or that object as JSON text (as RunPod
        carries it), or the platform's own text."""
        if isinstance(error, str):
            try:
                error = json.loads(error)
            except ValueError:
                return cls("endpoint", error, job_id=job_id)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            kind = cls_for(str(error.get("type", "backend")))
            return kind(str(error.get("type", "backend")), error["message"], error.get("details"), job_id)
        if isinstance(error, dict) and "error_message" in error:
            # The runpod SDK's report of a handler that raised (type, message, traceback).
            return cls("backend", str(error["error_message"]), error, job_id)
        return cls("endpoint", error if isinstance(error, str) else json.dumps(error), job_id=job_id)

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return error


class JobCancelled(JobFailed):
    """The job was cancelled (by `Job.cancel`, Ctrl-C, or on the platform)."""


class InvalidRequest(JobFailed, ValueError):
    """Refused on the caller's side, before anything was sent: the worker would refuse it too."""


def cls_for(error_type: str) -> type[JobFailed]:
    return JobCancelled if error_type == "cancelled" else JobFailed


class EndpointError(ClientError):
    """The endpoint could not be reached or answered something that is not RunPod's envelope."""


class NotSupported(EndpointError):
    """The endpoint has no route for this (the runpod SDK's local API server has no /cancel)."""


class ChecksumMismatch(ClientError):
    """A downloaded output's bytes differ from its `sha256` (or `bytes`) in the result."""

    def __init__(self, filename: str, expected: str, actual: str) -> None:
        super().__init__(f"{filename}: expected {expected}, got {actual}; the file was not kept")
        self.filename = filename
        self.expected = expected
        self.actual = actual


class DownloadError(ClientError):
    """An output could not be fetched (HTTP error, no URL nor data, bad base64)."""


class UploadError(ClientError):
    """A local input file could not be put in the S3 store."""
