"""Where output files go: inline base64 in the result, or an S3-compatible store."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Protocol

from .errors import JobError


class OutputStore(Protocol):
    name: str

    def put(self, path: Path, key: str, content_type: str) -> dict[str, Any]:
        """Store one file; returns the result fields that locate it (`data` or `url`/`s3_uri`)."""
        ...


class InlineStore:
    """Base64 in the result. RunPod caps response bodies (about 20 MB on /runsync), so the
    total is checked against `max_bytes` before any base64 is built."""

    name = "inline"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def check_total(self, total_bytes: int) -> None:
        if total_bytes > self.max_bytes:
            raise JobError(
                "storage",
                f"outputs total {total_bytes / 1e6:.1f} MB, above the {self.max_bytes / 1e6:g} MB inline "
                "limit (DIFFBOX_MAX_INLINE_MB); configure S3 storage (DIFFBOX_S3_BUCKET, "
                "DIFFBOX_S3_ENDPOINT_URL and AWS credentials) to receive large outputs as URLs",
                {"bytes": total_bytes, "limit_bytes": self.max_bytes},
            )

    def put(self, path: Path, key: str, content_type: str) -> dict[str, Any]:
        return {"data": base64.b64encode(path.read_bytes()).decode("ascii")}
