"""What a workflow module hands the service: a ComfyUI graph and what it needs to run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..inputs.media import InputImage

Graph = dict[str, dict[str, Any]]
# Decodes and verifies one request image value; the string names the field for errors.
ImageLoader = Callable[[str, str], InputImage]

# Inputs and outputs of a job live in this folder of ComfyUI's input/ and output/ folders, so
# concurrent jobs never see each other's files and clean-up is one folder each.
JOB_FOLDER = "diffbox"


@dataclass(frozen=True)
class JobContext:
    job_id: str
    # Differs on every run: ComfyUI answers a resubmitted identical graph from its cache with
    # the files of the earlier run (deleted by then), so no two runs may share a folder name.
    run_id: str = ""

    @property
    def subfolder(self) -> str:
        return f"{JOB_FOLDER}/{self.job_id}" + (f"-{self.run_id}" if self.run_id else "")

    def input_ref(self, name: str) -> str:
        """How a `LoadImage` node names a file uploaded for this job."""
        return f"{self.subfolder}/{name}"

    def output_prefix(self, name: str) -> str:
        """A save node's `filename_prefix` that puts its files in this job's folder."""
        return f"{self.subfolder}/{name}"


@dataclass
class Upload:
    name: str
    data: bytes


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
