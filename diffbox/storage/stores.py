"""Where output files go: inline base64 in the result, or an S3-compatible store (`s3.py`).

`OutputUploads` stores one job's files as ComfyUI reports them: each is described once
(size, sha256, media fields) and, for a store that streams, uploaded straight from disk in
a small pool while the job still runs. Inline data is built only at the end, once the total
is known to fit.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from ..errors import JobError, validation
from .outputs import describe


class OutputStore(Protocol):
    name: str
    # True: put() runs as soon as a file is reported; False: once all outputs are known.
    streams: bool

    def put(self, path: Path, key: str, content_type: str) -> dict[str, Any]:
        """Store one file; returns the result fields that locate it (`data` or `url`/`s3_uri`)."""
        ...


class InlineStore:
    """Base64 in the result. RunPod caps response bodies (about 20 MB on /runsync), so the
    total is checked against `max_bytes` before any base64 is built."""

    name = "inline"
    streams = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def check_total(self, total_bytes: int) -> None:
        if total_bytes > self.max_bytes:
            raise JobError(
                "storage",
                f"outputs total {total_bytes / 1e6:.3g} MB, above the {self.max_bytes / 1e6:g} MB inline "
                "limit (DIFFBOX_MAX_INLINE_MB); configure S3 storage (DIFFBOX_S3_BUCKET, "
                "DIFFBOX_S3_ENDPOINT_URL and AWS credentials) to receive large outputs as URLs",
                {"bytes": total_bytes, "limit_bytes": self.max_bytes},
            )

    def put(self, path: Path, key: str, content_type: str) -> dict[str, Any]:
        return {"data": base64.b64encode(path.read_bytes()).decode("ascii")}


def choose_store(requested: str | None, s3: OutputStore | None, max_inline_bytes: int) -> OutputStore:
    """The request's `output.store`, else S3 when configured, else inline."""
    if requested == "s3" and s3 is None:
        raise validation("output.store: 's3' needs S3 storage, which this endpoint does not configure "
                         "(DIFFBOX_S3_BUCKET or BUCKET_ENDPOINT_URL)")
    if requested == "inline" or s3 is None:
        return InlineStore(max_inline_bytes)
    return s3


def object_key(prefix: str, job_id: str, name: str) -> str:
    """`{prefix}/{job_id}/{name}`, without empty parts."""
    return "/".join(part for part in (prefix.strip("/"), job_id, name.strip("/")) if part)


class OutputUploads:
    """One job's outputs, in the order they were reported (used from the job's thread)."""

    def __init__(self, store: OutputStore, workers: int = 2, on_failure: Callable[[], None] | None = None) -> None:
        self.store = store
        # Told at the first failure, so the job can stop its prompt instead of running on
        # to a result it could not deliver.
        self.on_failure = on_failure
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="diffbox-output")
        self._items: list[tuple[str, dict[str, Any], Future[tuple[Path, dict[str, Any]]]]] = []
        self._keys: set[str] = set()

    def add(self, key: str, locate: Callable[[], Path], animated: bool, fields: dict[str, Any]) -> None:
        """Describe (and, when the store streams, upload) one file; `locate` gives its path."""
        if key in self._keys:
            # Two outputs with one name would overwrite each other in the bucket.
            key = posixpath.join(posixpath.dirname(key), f"{len(self._items)}_{posixpath.basename(key)}")
        self._keys.add(key)
        self._items.append((key, fields, self._pool.submit(self._one, key, locate, animated)))

    def _one(self, key: str, locate: Callable[[], Path], animated: bool) -> tuple[Path, dict[str, Any]]:
        try:
            path = locate()
            entry = describe(path, animated=animated)
            if self.store.streams:
                entry.update(self.store.put(path, key, entry["content_type"]))
        except BaseException:
            if self.on_failure is not None:
                self.on_failure()
            raise
        return path, entry

    def results(self) -> list[dict[str, Any]]:
        """Every output's result entry; the first failure, once all have ended, fails the job
        (a result never lists some outputs as stored while others were lost)."""
        wait([future for _, _, future in self._items])
        done = [(key, fields, future.result()) for key, fields, future in self._items]
        if isinstance(self.store, InlineStore):
            self.store.check_total(sum(entry["bytes"] for _, _, (_, entry) in done))
        results = []
        for key, fields, (path, entry) in done:
            if not self.store.streams:
                entry.update(self.store.put(path, key, entry["content_type"]))
            results.append({**entry, **fields})
        return results

    def close(self) -> None:
        """Drop what has not started and wait for the rest: files are deleted only after."""
        self._pool.shutdown(wait=True, cancel_futures=True)
