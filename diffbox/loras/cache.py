"""The LoRA cache: `{models}/loras/diffbox-cache/`, shared by every worker on the volume.

Files are named by their sha256 (`<sha256>.safetensors`, with `<sha256>.json` recording the
sources it came from), so ComfyUI loads `diffbox-cache/<sha256>.safetensors` whatever the
source called it, and two sources of the same bytes share one file. `.index/` maps a source
(a key naming exactly one version of it) to the sha256 it gave.

Workers coordinate through `flock` on lock files in `.locks/`:
- fetching a source holds `src-<key>.lock` exclusively, so one worker downloads and the
  others wait, then find the file (no file is ever downloaded twice at the same time);
- a job holds `<sha256>.lock` shared while it runs, and eviction removes an entry only
  when it can take that lock exclusively (never a file a running job uses);
- downloads go to `.tmp/<key>.<random>.part` and are renamed into place once checked, so
  nobody ever sees half a file; ComfyUI lists only model extensions, never `.part`.
Least recently used entries (file mtime, touched on each use) go first when the cache
holds more than its budget (DIFFBOX_LORA_CACHE_GB).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .. import logs

log = logs.get("loras")
FOLDER = "diffbox-cache"  # under ComfyUI's `loras` folder
SUFFIX = ".safetensors"
LOCK_POLL_S = 0.2


class Pin:
    """A shared lock on one entry: while it is held, eviction leaves the entry alone."""

    def __init__(self, sha256: str, handle: IO[bytes]) -> None:
        self.sha256 = sha256
        self._handle = handle

    def release(self) -> None:
        self._handle.close()  # closing the descriptor releases its flock


class LoraCache:
    def __init__(self, loras_dir: Path, budget_bytes: int) -> None:
        self.root = loras_dir / FOLDER
        self.budget_bytes = budget_bytes
        self._locks = self.root / ".locks"
        self._index = self.root / ".index"
        self._tmp = self.root / ".tmp"

    @staticmethod
    def comfy_name(sha256: str) -> str:
        """How a LoraLoader node names the entry (relative to ComfyUI's loras folders)."""
        return f"{FOLDER}/{sha256}{SUFFIX}"

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}{SUFFIX}"

    def _prepare(self) -> None:
        for folder in (self._locks, self._index, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def _open_lock(self, name: str) -> IO[bytes]:
        self._prepare()
        return (self._locks / f"{name}.lock").open("ab")

    @contextlib.contextmanager
    def source_lock(self, key: str, give_up: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Held while a source is resolved and fetched: one fetch of it at a time, volume-wide.
        While another worker holds it, `give_up` is called between tries (it raises to stop waiting)."""
        with self._open_lock(f"src-{_digest(key)}") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    give_up()
                    time.sleep(LOCK_POLL_S)
            yield

    def lookup(self, key: str) -> dict[str, Any] | None:
        """What a source gave before (`sha256`, and what `remember` noted with it), if that file
        is still here."""
        try:
            record = json.loads((self._index / f"{_digest(key)}.json").read_text())
            sha256 = str(record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if self.path(sha256).is_file() else None

    def remember(self, key: str, sha256: str, **noted: str | None) -> None:
        self._prepare()
        _write_json(self._index / f"{_digest(key)}.json", {"sha256": sha256, **noted})

    def pin(self, sha256: str) -> Pin | None:
        """Pin the entry for a job and mark it used; None when it is not (or no longer) here."""
        handle = self._open_lock(sha256)
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            os.utime(self.path(sha256))  # the LRU clock
        except FileNotFoundError:
            handle.close()
            return None
        return Pin(sha256, handle)

    def temp_path(self, key: str) -> Path:
        self._prepare()
        return self._tmp / f"{_digest(key)}.{uuid.uuid4().hex[:12]}.part"

    def add(self, temp: Path, sha256: str, source: str) -> Pin:
        """Move a checked download into place (pinned before anyone can see it) and record its source."""
        handle = self._open_lock(sha256)
        fcntl.flock(handle, fcntl.LOCK_SH)
        final = self.path(sha256)
        if final.is_file():  # the same bytes from another source
            temp.unlink()
            os.utime(final)
        else:
            os.replace(temp, final)
        record_path = self.root / f"{sha256}.json"
        try:
            record: dict[str, Any] = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {"sha256": sha256, "bytes": final.stat().st_size, "sources": []}
        if source not in record["sources"]:
            record["sources"].append(source)
        _write_json(record_path, record)
        return Pin(sha256, handle)

    def evict(self) -> list[str]:
        """Remove least recently used entries until the cache fits its budget, skipping any a
        job has pinned; returns the sha256s removed."""
        self._prepare()
        with self._open_lock("evict") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self._drop_abandoned_parts()
            entries = []
            for path in self.root.glob(f"*{SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path.name.removesuffix(SUFFIX)))
            total = sum(size for _, size, _ in entries)
            removed = []
            for _, size, sha256 in sorted(entries):
                if total <= self.budget_bytes:
                    break
                with self._open_lock(sha256) as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a running job uses it
                    self.path(sha256).unlink(missing_ok=True)
                    (self.root / f"{sha256}.json").unlink(missing_ok=True)
                total -= size
                removed.append(sha256)
            self._forget(set(removed))
            if removed or total > self.budget_bytes:
                logs.event(log, "lora cache evicted", removed=len(removed), bytes=total,
                           budget_bytes=self.budget_bytes, level=20 if total <= self.budget_bytes else 30)
            return removed

    def _forget(self, removed: set[str]) -> None:
        # Index records are only hints (lookup checks the file), but need not outlive it.
        # Lock files stay: removing one while another worker has it open would split the lock.
        if not removed:
            return
        for record in self._index.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if json.loads(record.read_text())["sha256"] in removed:
                    record.unlink()

    def _drop_abandoned_parts(self) -> None:
        # A worker that died mid-download left its part behind; a part whose source lock is free
        # is no one's.
        for part in self._tmp.glob("*.part"):
            with self._open_lock(f"src-{part.name.partition('.')[0]}") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                part.unlink(missing_ok=True)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temp.write_text(json.dumps(value))
    os.replace(temp, path)
