"""Failures a caller can act on, as values.

Every failure a user can cause ends as a `JobError`, which the adapters turn into the
result contract's `{"error": {"type", "message", "details"}}`.
"""

from __future__ import annotations

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


def validation(message: str, details: Any = None) -> JobError:
    return JobError("validation", message, details)


def backend(message: str, details: Any = None) -> JobError:
    return JobError("backend", message, details)
