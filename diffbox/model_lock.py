"""The weights lock (`weights.lock.json`, beside the weights): what the builder actually
fetched for each manifest entry. The manifest says what we want (a repo, a path, a branch,
tag or commit); the lock says what we got (the commit the Hub resolved that to, and the size
and sha256 of the bytes written). The builder writes it; `builder verify`, `--locked` and the
worker's pre-queue check read it.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LOCK_NAME = "weights.lock.json"


class LockedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    path: str
    folder: str
    revision: str = Field(description="as the manifest asked for it: a branch, tag or commit")
    commit: str = Field(description="the commit the Hub resolved the revision to")
    size: int
    sha256: str = Field(description="of the bytes written, checked against the Hub's when it reports one")
    fetched_at: str = Field(description="when the file was fetched or adopted (UTC, ISO 8601)")


class WeightsLock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    # Keyed by the manifest entry's key.
    files: dict[str, LockedFile] = Field(default_factory=dict)


class LockError(ValueError):
    """A lock file that can't be read; the message names the file."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def read(path: Path) -> WeightsLock:
    try:
        return WeightsLock.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise LockError(f"{path}: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise LockError(f"{path}: not a weights lock ({exc.errors()[0]['msg']})") from None


def read_if_present(path: Path) -> WeightsLock | None:
    return read(path) if path.is_file() else None


def write(path: Path, lock: WeightsLock) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(lock.model_dump_json(indent=1) + "\n")
    # Atomic: a worker reading the lock never sees half of one.
    tmp.replace(path)
