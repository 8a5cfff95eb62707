"""Failures a caller can act on, as values.

Every failure a user can cause ends as a `JobError`, which the adapters turn into the
result contract's `{"error": {"type", "message", "details"}}`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

ErrorType = Literal["validation", "backend", "timeout", "cancelled", "storage"]


class JobError(Exception):
    def __init__(self, type: ErrorType, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.type: ErrorType = type
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


def clip(value: Any, limit: int = 80) -> str:
    """A caller's value as an error message quotes it: repr'd and cut to `limit` characters, so
    a megabyte-long name never becomes a megabyte-long error (errors are logged and returned)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_name(key: str, limit: int = 100) -> str:
    """A caller's key (field, node id) as a message names it: as is when short and printable."""
    return key if len(key) <= limit and key.isprintable() else clip(key, limit)


def validation(message: str, details: Any = None) -> JobError:
    return JobError("validation", message, details)


def backend(message: str, details: Any = None) -> JobError:
    return JobError("backend", message, details)


def as_text(error: Any) -> Any:
    """RunPod's API carries a job's `error` as a string (the SDK's local server refuses anything
    else), so an error object travels as JSON text: `json.loads` gives it back."""
    return json.dumps(error) if isinstance(error, dict) else error
