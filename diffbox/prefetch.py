"""The weights a cold worker's first job will need, read into the page cache in parallel from
the moment the worker starts.

Left alone, the first job reads each weight file only when its loader node runs, one after
another, after ComfyUI has finished starting. Read early, the reads overlap ComfyUI's start and
each other, and on network volumes several streams get more bandwidth than one; ComfyUI's
loaders then find the files in memory (docs/cold-start.md has the figures).

What: the files of DIFFBOX_PREFETCH's entries (by default DIFFBOX_WARMUP's), in the order
workflows/models.json lists them, cut into chunks that several threads take in that order, so
the first file listed is complete first.

Bounds: it reads only into free memory (`pagecache.free_bytes`, less a reserve), so it never
pushes out a page ComfyUI or anyone else holds, and it stops when that runs out. A chunk
already in the cache is skipped: once a job's own loads overtake it, the rest costs a look each.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import logs, pagecache, warmup
from .config import Settings
from .errors import JobError
from .workflows import manifest, parse

log = logs.get("prefetch")
MIB = 1024 * 1024
MB = 1000 * 1000  # figures in the log, as storage vendors give theirs
CHUNK_BYTES = 32 * MIB  # a multiple of every page size; large enough that a look at the cache is cheap
READ_BYTES = 4 * MIB
Ended = Literal["done", "memory", "stopped", "read error"]


@dataclass(frozen=True)
class Report:
    files: int
    total_bytes: int
    read_bytes: int  # read from the disk by the prefetch
    cached_bytes: int  # found in the cache already (an earlier read, or ComfyUI's own)
    seconds: float
    ended: Ended


def files_for(entries: Sequence[str], settings: Settings) -> list[Path]:
    """The weight files of `entries` (`workflow[:preset][:model]`, as DIFFBOX_WARMUP's) that are
    on this worker's disk, each once, in the manifest's order; an entry naming no workflow with
    weights here is logged and skipped."""
    paths: dict[Path, None] = {}
    for entry in entries:
        try:
            workflow, request = parse(warmup.request_for(entry))
        except (ValueError, JobError) as exc:
            logs.event(log, "prefetch entry skipped", level=30, entry=entry, error=str(exc))
            continue
        if workflow.models is None or not settings.serves(workflow.name):
            continue
        for model in manifest.load().required(*workflow.models(request)):
            paths[model.local_path(settings.models_dir)] = None
    return [path for path in paths if path.is_file()]


Chunk = tuple[int, int, int]  # a file descriptor, an offset in its file, a length


def _chunks(files: Sequence[tuple[int, int]], chunk_bytes: int) -> Iterator[Chunk]:
    for fd, size in files:
        for offset in range(0, size, chunk_bytes):
            yield fd, offset, min(chunk_bytes, size - offset)


class Prefetch:
    def __init__(self, files: Sequence[Path], threads: int, reserve_bytes: int,
                 free: Callable[[], int | None] = pagecache.free_bytes, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.files = list(files)
        self.threads = threads
        self.reserve_bytes = reserve_bytes
        self._free = free
        self._chunk_bytes = chunk_bytes
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._read = self._cached = 0
        self._ended: Ended = "done"
        self.report: Report | None = None

    def start(self) -> Prefetch:
        threading.Thread(target=self._run, name="prefetch", daemon=True).start()
        return self

    def stop(self) -> None:
        """End the reads (each thread after its current one) and close the files."""
        self._end("stopped")

    def wait(self, timeout_s: float | None = None) -> Report | None:
        self._done.wait(timeout_s)
        return self.report

    def _end(self, why: Ended) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._ended = why
            self._stop.set()

    def _run(self) -> None:
        t0 = time.monotonic()
        opened: list[tuple[int, int]] = []
        try:
            for path in self.files:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                opened.append((fd, os.fstat(fd).st_size))
            total = sum(size for _, size in opened)
            logs.event(log, "prefetch started", files=len(opened), mb=round(total / MB), threads=self.threads)
            chunks = _chunks(opened, self._chunk_bytes)
            with ThreadPoolExecutor(self.threads, thread_name_prefix="prefetch") as pool:
                for _ in pool.map(lambda _: self._reader(chunks), range(self.threads)):
                    pass
        except OSError as exc:
            logs.event(log, "prefetch failed", level=30, error=str(exc))
            self._end("read error")
        finally:
            for fd, _ in opened:
                os.close(fd)
            seconds = logs.since(t0)
            self.report = Report(len(opened), sum(size for _, size in opened), self._read, self._cached,
                                 seconds, self._ended)
            logs.event(log, "prefetch ended", ended=self._ended, read_mb=round(self._read / MB),
                       cached_mb=round(self._cached / MB), seconds=seconds,
                       read_mb_per_s=round(self._read / MB / seconds) if seconds > 0 else None)
            self._done.set()

    def _reader(self, chunks: Iterator[Chunk]) -> None:
        buffer = memoryview(bytearray(READ_BYTES))
        while not self._stop.is_set():
            with self._lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            fd, offset, length = chunk
            if pagecache.cached_bytes(fd, offset, length) >= length:
                with self._lock:
                    self._cached += length
                continue
            free = self._free()
            if free is not None and free - length < self.reserve_bytes:
                self._end("memory")
                return
            try:
                self._read_chunk(fd, offset, length, buffer)
            except OSError as exc:
                logs.event(log, "prefetch read failed", level=30, error=str(exc))
                self._end("read error")
                return

    def _read_chunk(self, fd: int, offset: int, length: int, buffer: memoryview) -> None:
        end = offset + length
        while offset < end and not self._stop.is_set():
            got = os.preadv(fd, [buffer[:min(READ_BYTES, end - offset)]], offset)
            if got == 0:
                return  # the file shrank: nothing more to read
            offset += got
            with self._lock:
                self._read += got


def start(settings: Settings, entries: Sequence[str]) -> Prefetch | None:
    """Start prefetching the files of `entries` in the background; None when there are none."""
    files = files_for(entries, settings)
    if not files:
        return None
    return Prefetch(files, settings.prefetch_threads, int(settings.prefetch_reserve_gb * 1024 * MIB)).start()
