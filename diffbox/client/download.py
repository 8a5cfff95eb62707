"""A result's outputs saved to disk: fetched from their URLs or decoded inline, and checked
against the `bytes` and `sha256` the worker computed before it stored them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from .errors import ChecksumMismatch, DownloadError

BLOCK = 1 << 20
# A presigned URL can be slow to start on a cold store; reading then streams.
TIMEOUT_S = (10.0, 300.0)


def outputs_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The output entries of a result: typed workflows list `outputs`; raw graphs keep the
    official ComfyUI worker's `images`."""
    entries = result.get("outputs", result.get("images")) or []
    return [entry for entry in entries if isinstance(entry, dict)]


def save_outputs(outputs: list[dict[str, Any]], directory: Path,
                 session: requests.Session | None = None) -> list[Path]:
    """Save each output into `directory` under its file name (made unique within the call)."""
    directory.mkdir(parents=True, exist_ok=True)
    session = session or requests.Session()
    used: set[str] = set()
    paths = []
    for index, entry in enumerate(outputs):
        name = _unique(_safe_name(entry, index), used)
        paths.append(save_output(entry, directory / name, session))
    return paths


def save_output(entry: dict[str, Any], path: Path, session: requests.Session) -> Path:
    """Write one output to `path` through a `.part` file, renamed only once its checksum matches."""
    partial = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as f:
            for block in _blocks(entry, path.name, session):
                f.write(block)
                digest.update(block)
                size += len(block)
        _check(entry, path.name, size, digest.hexdigest())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def source_url(entry: dict[str, Any]) -> str | None:
    # Raw-graph results in the official worker's shape carry the URL in `data` too (type s3_url).
    url = entry.get("url") or (entry.get("data") if entry.get("type") == "s3_url" else None)
    return url if isinstance(url, str) else None


def _blocks(entry: dict[str, Any], name: str, session: requests.Session) -> Iterator[bytes]:
    if (url := source_url(entry)) is not None:
        try:
            with session.get(url, stream=True, timeout=TIMEOUT_S) as response:
                # The URL is never shown: a presigned one is a credential while it lasts.
                if response.status_code >= 400:
                    raise DownloadError(f"{name}: HTTP {response.status_code} from its URL")
                yield from response.iter_content(BLOCK)
        except requests.RequestException as exc:
            raise DownloadError(f"{name}: could not fetch its URL: {type(exc).__name__}") from None
    elif isinstance(entry.get("data"), str):
        try:
            yield base64.b64decode(entry["data"], validate=True)
        except (binascii.Error, ValueError):
            raise DownloadError(f"{name}: its inline data is not valid base64") from None
    else:
        raise DownloadError(f"{name}: the entry has neither a url nor inline data")


def _check(entry: dict[str, Any], name: str, size: int, sha256: str) -> None:
    expected_size = entry.get("bytes")
    if isinstance(expected_size, int) and expected_size != size:
        raise ChecksumMismatch(name, f"{expected_size} bytes", f"{size} bytes")
    expected = entry.get("sha256")
    if isinstance(expected, str) and expected.lower() != sha256:
        raise ChecksumMismatch(name, f"sha256 {expected}", f"sha256 {sha256}")


def _safe_name(entry: dict[str, Any], index: int) -> str:
    # A name from the endpoint never leaves the directory: its last part, no leading dots.
    name = Path(str(entry.get("filename") or "")).name.lstrip(".")
    if name:
        return name
    extension = mimetypes.guess_extension(str(entry.get("content_type") or "")) or ""
    return f"output-{index + 1}{extension}"


def _unique(name: str, used: set[str]) -> str:
    stem, dot, suffix = name.partition(".")
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    used.add(candidate)
    return candidate
