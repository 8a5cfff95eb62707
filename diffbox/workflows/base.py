"""What a workflow module hands the service: a ComfyUI graph and what it needs to run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..inputs.media import InputImage

# Our files in ComfyUI's input and output folders live under this folder: each job's outputs in
# a folder of its own, inputs in one folder per worker (backends/comfyui_inputs.py).
JOB_FOLDER = "diffbox"

Graph = dict[str, dict[str, Any]]
# Decodes and verifies one request image value; the string names the field for errors.
ImageLoader = Callable[[str, str], InputImage]


@dataclass(frozen=True)
class JobContext:
    job_id: str
    # Differs on every run: ComfyUI answers a resubmitted identical graph from its cache with
    # the files of the earlier run (deleted by then), so no two runs may share a folder name.
    run_id: str = ""
    # Where the worker keeps inputs in ComfyUI's input folder, named by their content
    # (backends/comfyui_inputs.py), so that ComfyUI's cache knows an image a job sent before.
    input_folder: str = f"{JOB_FOLDER}/in"

    @property
    def subfolder(self) -> str:
        """The job's own folder in ComfyUI's output folder: concurrent jobs never see each
        other's outputs, and clean-up is one folder."""
        return f"{JOB_FOLDER}/{self.job_id}" + (f"-{self.run_id}" if self.run_id else "")

    def input_ref(self, name: str) -> str:
        """How a `LoadImage` node names an input file (`Upload.name`) of this job."""
        return f"{self.input_folder}/{name}"

    def output_prefix(self, name: str) -> str:
        """A save node's `filename_prefix` that puts its files in this job's folder."""
        return f"{self.subfolder}/{name}"


@dataclass
class Upload:
    name: str
    data: bytes

    @classmethod
    def of(cls, image: InputImage) -> Upload:
        """An input image, named by its content: the same bytes, the same name in every job."""
        return cls(f"{hashlib.sha256(image.data).hexdigest()[:32]}.{image.extension}", image.data)


@dataclass
class Plan:
    workflow: str
    graph: Graph
    uploads: list[Upload] = field(default_factory=list)
    # Echoed in the result: the settings the job really used (seeds drawn, presets resolved).
    settings: dict[str, Any] = field(default_factory=dict)
    # For multi-clip graphs: which clip each node belongs to (progress counts clips).
    node_clip: dict[str, int] = field(default_factory=dict)
    clips: int = 0
    # Output nodes whose files are per-clip partials (reported with their clip number).
    partial_nodes: dict[str, int] = field(default_factory=dict)
    # The request's own LoRA loaders: node id -> index in `loras` (workflows/loras.py).
    lora_nodes: dict[str, int] = field(default_factory=dict)
