"""The model manifest (`workflows/models.json`): which weight files each workflow and preset
needs, where they come from, and whether they are on this worker's disk.

Checking before queuing turns a missing file into a clear error naming every file, instead
of a ComfyUI validation error about one combo value after the job has waited for the GPU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import JobError
from .graph import WORKFLOWS_DIR


@dataclass(frozen=True)
class ModelFile:
    key: str
    repo: str
    revision: str
    path: str
    folder: str
    size: int | None  # None where no source gave one (workflows/README.md)
    sha256: str | None

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
    files = {key: ModelFile(key=key, **entry) for key, entry in data["files"].items()}
    return Manifest(files=files, workflows=data["workflows"])


def check_present(model_set: str, preset: str, models_dir: Path) -> None:
    """Fail, naming every missing file, unless the weights of `model_set` with `preset` are all
    under `models_dir/<folder>/<file name>`."""
    missing = [f for f in load().required(model_set, preset) if not f.local_path(models_dir).is_file()]
    if missing:
        names = ", ".join(f"{f.folder}/{f.name}" for f in missing)
        raise JobError(
            "backend",
            f"missing model files for {model_set}:{preset} under {models_dir} (DIFFBOX_MODELS_DIR): {names}",
            {"missing": [f.describe() for f in missing], "models_dir": str(models_dir)},
        )
