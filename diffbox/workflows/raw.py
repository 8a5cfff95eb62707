"""Raw ComfyUI graphs: the official RunPod ComfyUI worker's input, unchanged.

`{"workflow": <API-format graph>, "images": [{"name", "image"}]}`. The graph is checked
for shape (so a malformed one costs no GPU time and the error names the node), its images
go to this job's input folder, `LoadImage` names are pointed there, save nodes write into
this job's output folder, and sampler seeds of -1 or absent are drawn and returned.
"""

from __future__ import annotations

import posixpath
import secrets
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..errors import clip, key_name, validation
from ..schemas import OutputOptions, Strict
from .base import Graph, ImageLoader, JobContext, Plan, Upload

MAX_NODES = 2000
# Node classes whose seed is drawn when the graph gives -1 or none, and the input it lives in.
SEEDED_CLASSES = {
    "KSampler": "seed",
    "KSamplerAdvanced": "noise_seed",
    "RandomNoise": "noise_seed",
    "SamplerCustom": "noise_seed",
}
MAX_SEED = 2**53 - 1  # exact in JSON numbers everywhere (JavaScript clients included)


class NamedImage(Strict):
    name: str = Field(min_length=1, max_length=200, description="The file name the graph's LoadImage names.")
    image: str = Field(min_length=1, description="https:// or s3:// URL, data URI or base64.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # Only matched against the graph's LoadImage inputs (the file is named by its content),
        # but a name with a path in it is a mistake its caller should hear of.
        if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\0" in name:
            raise ValueError("must be a plain file name (no '/', '\\' or leading '.')")
        return name


class RawRequest(Strict):
    workflow: dict[str, Any] = Field(description="A ComfyUI API-format graph: {node id: {class_type, inputs}}")
    images: list[NamedImage] = Field(
        default_factory=list, max_length=16,
        description="Input images, each loaded where the graph's LoadImage gives its name.")
    output: OutputOptions | None = Field(default=None, description="Where the outputs go.")

    @model_validator(mode="after")
    def _graph_shape(self) -> RawRequest:
        check_graph(self.workflow)
        return self


def check_allowed(graph: dict[str, Any], allowlist: list[str]) -> None:
    for node_id, node in graph.items():
        if node["class_type"] not in allowlist:
            raise validation(f"workflow.{key_name(node_id)}: node class {key_name(node['class_type'])} is not allowed "
                             "on this endpoint")


def check_graph(graph: dict[str, Any]) -> None:
    """Refuse graphs ComfyUI would choke on, naming the node; ComfyUI validates the rest."""
    if not graph:
        raise validation("workflow: the graph has no nodes")
    if len(graph) > MAX_NODES:
        raise validation(f"workflow: {len(graph)} nodes, more than the {MAX_NODES} allowed")
    for node_id, node in graph.items():
        where = f"workflow.{key_name(node_id)}"
        if not isinstance(node, dict):
            raise validation(f"{where}: a node must be an object with class_type and inputs")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise validation(f"{where}: missing class_type")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise validation(f"{where}.inputs: must be an object")
        for name, value in inputs.items():
            if _is_link(value) and str(value[0]) not in graph:
                raise validation(f"{where}.inputs.{key_name(name)}: links to node {clip(value[0])}, "
                                 "which is not in the graph")
    _refuse_cycles(graph)


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _refuse_cycles(graph: dict[str, Any]) -> None:
    # Iterative three-colour DFS: recursion would overflow on a long chain of nodes.
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, _deps(graph, start))]
        state[start] = 1
        while stack:
            node, deps = stack[-1]
            if not deps:
                state[node] = 2
                stack.pop()
                continue
            dep = deps.pop()
            if state.get(dep) == 1:
                raise validation(f"workflow.{key_name(dep)}: the graph has a cycle through node {key_name(dep)}")
            if not state.get(dep):
                state[dep] = 1
                stack.append((dep, _deps(graph, dep)))


def _deps(graph: dict[str, Any], node_id: str) -> list[str]:
    inputs = graph[node_id].get("inputs", {})
    return [str(v[0]) for v in inputs.values() if _is_link(v)]


def plan(request: RawRequest, ctx: JobContext, load_image: ImageLoader) -> Plan:
    """The graph to queue for this job."""
    # The request's names, as its LoadImage nodes give them, for files named by their content.
    uploads = {img.name: Upload.of(load_image(img.image, f"images[{i}].image")) for i, img in enumerate(request.images)}
    graph: Graph = {str(k): _copy_node(v) for k, v in request.workflow.items()}
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"].startswith("LoadImage") and inputs.get("image") in uploads:
            inputs["image"] = ctx.input_ref(uploads[inputs["image"]].name)
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str):
            inputs["filename_prefix"] = ctx.output_prefix(_safe_prefix(prefix))
    seeds = _draw_seeds(graph)
    settings: dict[str, Any] = {}
    if seeds:
        settings["seeds"] = seeds
        if len(set(seeds.values())) == 1:
            settings["seed"] = next(iter(seeds.values()))
    return Plan(workflow="raw", graph=graph, uploads=list({u.name: u for u in uploads.values()}.values()),
                settings=settings)


def _copy_node(node: dict[str, Any]) -> dict[str, Any]:
    return {**node, "inputs": dict(node.get("inputs", {}))}


def _safe_prefix(prefix: str) -> str:
    # Keep the user's own sub-folders but never let them climb out of the job's folder.
    parts = [p for p in posixpath.normpath("/" + prefix.replace("\\", "/")).split("/") if p]
    return "/".join(parts) or "ComfyUI"


def _draw_seeds(graph: Graph) -> dict[str, int]:
    seeds: dict[str, int] = {}
    for node_id, node in graph.items():
        key = SEEDED_CLASSES.get(node["class_type"])
        if key is None:
            continue
        value = node["inputs"].get(key)
        if value is None or value == -1:
            value = secrets.randbelow(MAX_SEED)
            node["inputs"][key] = value
        if isinstance(value, int):
            seeds[node_id] = value
    return seeds
