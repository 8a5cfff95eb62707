"""The model manifest (`workflows/models.json`): which weight files each workflow and preset
needs, where they come from (repo, path, and a revision: a branch, tag or commit), and whether
they are on this worker's disk. Its sizes are estimates for planning disk space; what was
actually fetched is in the weights lock (`diffbox.model_lock`).

Checking before queuing turns a missing file into a clear error naming every file, instead
of a ComfyUI validation error about one combo value after the job has waited for the GPU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .. import model_lock
from ..errors import JobError
from .graph import WORKFLOWS_DIR

_FIELDS = ("repo", "revision", "path", "folder", "size")


@dataclass(frozen=True)
class ModelFile:
    key: str
    repo: str
    revision: str
    path: str
    folder: str
    # An estimate, for planning disk space and time; never compared with what the Hub serves.
    size: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def local_path(self, models_dir: Path) -> Path:
        return models_dir / self.folder / self.name

    def describe(self) -> dict[str, Any]:
        return {"file": self.name, "folder": self.folder, "repo": self.repo, "path": self.path}


@dataclass(frozen=True)
class Manifest:
    files: dict[str, ModelFile]
    workflows: dict[str, dict[str, list[str]]]

    def required(self, model_set: str, preset: str) -> list[ModelFile]:
        """The files of one model set ("i2v", "qwen_edit:2511") with one preset."""
        try:
            keys = self.workflows[model_set][preset]
        except KeyError:
            raise KeyError(f"models.json has no entry for {model_set}:{preset}") from None
        return [self.files[key] for key in keys]


@functools.cache
def load(path: Path = WORKFLOWS_DIR / "models.json") -> Manifest:
    data = json.loads(path.read_text())
    for key, entry in data["files"].items():
        if set(entry) != set(_FIELDS):
            raise ValueError(f"{path}: files.{key} has fields {sorted(entry)}, expected {list(_FIELDS)} "
                             "(hashes and commits belong in the weights lock, not the manifest)")
    files = {key: ModelFile(key=key, **entry) for key, entry in data["files"].items()}
    return Manifest(files=files, workflows=data["workflows"])


def fetch_command(model_set: str, preset: str, models_dir: Path) -> str:
    return f"python -m builder download --workflows {model_set} --presets {preset} --dest {models_dir}"


def _problem(f: ModelFile, models_dir: Path, lock: model_lock.WeightsLock | None) -> str | None:
    """Why the file of `f` under `models_dir` can't be used, or None. Sizes only: hashing
    the 14 GB files of a Wan job would take longer than many jobs do (docs/weights.md)."""
    try:
        size = f.local_path(models_dir).stat().st_size
    except FileNotFoundError:
        return "missing"
    entry = lock.files.get(f.key) if lock is not None else None
    if entry is None:
        return None  # no lock (weights placed by hand): presence is all that can be checked
    if (entry.repo, entry.path) != (f.repo, f.path):
        return f"the lock records {entry.repo}/{entry.path}, not {f.repo}/{f.path}"
    if size != entry.size:
        return f"{size} bytes, the lock says {entry.size}"
    return None


def check_on_disk(model_set: str, preset: str, models_dir: Path) -> None:
    """Fail, naming every file and the command that fetches them, unless the weights of
    `model_set` with `preset` are under `models_dir/<folder>/<file name>` with the sizes the
    weights lock beside them records."""
    lock_file = models_dir / model_lock.LOCK_NAME
    try:
        lock = model_lock.read_if_present(lock_file)
    except model_lock.LockError as exc:
        raise JobError("backend", f"the weights lock can't be read: {exc}", {"models_dir": str(models_dir)}) from None
    problems = [(f, why) for f in load().required(model_set, preset)
                if (why := _problem(f, models_dir, lock)) is not None]
    if not problems:
        return
    command = fetch_command(model_set, preset, models_dir)
    names = ", ".join(f"{f.folder}/{f.name} ({why})" for f, why in problems)
    raise JobError(
        "backend",
        f"model files for {model_set}:{preset} missing or not as {model_lock.LOCK_NAME} records under {models_dir} "
        f"(DIFFBOX_MODELS_DIR): {names}. Fetch them with: {command}",
        {"files": [{**f.describe(), "problem": why} for f, why in problems], "models_dir": str(models_dir),
         "lock": str(lock_file) if lock is not None else None, "fetch": command},
    )
