"""Jobs' input files in ComfyUI's input folder, named by their content and counted.

ComfyUI reuses a node's output from an earlier prompt when the node's inputs are the same, and
a `LoadImage` node's inputs are its file's name and a hash of its bytes. Named by their content
in one folder for this worker, the same image sent by two jobs is the same file to ComfyUI: the
second job's encodes of it (a Qwen edit's vision and VAE encode, Wan's encode of its start image)
come from the cache when their other inputs repeat too (a new seed, another LoRA). Per-job
folders made every job encode again.

A file is written when the first job holding it starts and removed when the last one lets go;
one folder per worker process, so workers sharing one ComfyUI never remove each other's files.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import backend

Uploader = Callable[[str, bytes, str], object]  # name, bytes, sub-folder (ComfyUI's /upload/image)


class HeldInputs:
    """One job's hold on its input files; `release` is safe to call more than once."""

    def __init__(self, owner: SharedInputs, names: list[str]) -> None:
        self._owner = owner
        self._names: list[str] | None = names

    def release(self) -> None:
        names, self._names = self._names, None
        if names:
            self._owner.let_go(names)


class SharedInputs:
    def __init__(self, parent: str, input_dir: Path | None, upload: Uploader) -> None:
        # A new name on every start: a file an earlier process left is never taken for one held now.
        self.folder = f"{parent}/in-{uuid.uuid4().hex[:8]}"
        self._dir = input_dir / self.folder if input_dir is not None else None
        self._upload = upload
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hold(self, files: Sequence[tuple[str, bytes]]) -> HeldInputs:
        """Make each (name, bytes) file present in `folder` for as long as the returned hold
        lasts. Where ComfyUI's input folder is on this disk a file already held is left as it
        is (a running prompt may be reading it); elsewhere it goes through /upload/image."""
        names: list[str] = []
        try:
            for name, data in dict(files).items():
                self._hold_one(name, data)
                names.append(name)
        except BaseException:
            self.let_go(names)
            raise
        return HeldInputs(self, names)

    def _hold_one(self, name: str, data: bytes) -> None:
        with self._lock:
            if self._dir is None:
                self._upload(name, data, self.folder)
            elif not self._held[name]:
                self._write(name, data)
            self._held[name] += 1

    def _write(self, name: str, data: bytes) -> None:
        assert self._dir is not None
        path = self._dir / name
        temp = self._dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(data)
            os.replace(temp, path)  # whole or not at all: ComfyUI hashes the file it finds
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise backend(f"could not write input {name!r} into ComfyUI's input folder: "
                          f"{exc.strerror or type(exc).__name__}") from None

    def let_go(self, names: list[str]) -> None:
        """One hold fewer on each of `names` (HeldInputs.release calls it)."""
        with self._lock:
            for name in names:
                self._held[name] -= 1
                if self._held[name] > 0:
                    continue
                del self._held[name]
                if self._dir is not None:
                    (self._dir / name).unlink(missing_ok=True)
            if self._dir is not None and not self._held:
                # Not there, or holding a file not ours: then it is not this worker's to remove.
                with contextlib.suppress(OSError):
                    self._dir.rmdir()

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)
