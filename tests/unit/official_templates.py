"""Read the official ComfyUI templates (UI format, one subgraph) from the installed
`comfyui-workflow-templates-json` package, resolving their preset switches, so tests can
compare our graphs with them."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

# Nodes the UI uses to wire widgets and presets; they are not part of an API-format graph.
UI_ONLY = {"PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "ComfySwitchNode", "ComfyMathExpression",
           "MarkdownNote", "Note"}
# KSampler(Advanced) widget order in the UI format ("control_after_generate" follows the seed).
KSAMPLER_ADVANCED_WIDGETS = ["add_noise", "noise_seed", "control", "steps", "cfg", "sampler_name", "scheduler",
                             "start_at_step", "end_at_step", "return_with_leftover_noise"]
KSAMPLER_WIDGETS = ["seed", "control", "steps", "cfg", "sampler_name", "scheduler", "denoise"]


@dataclass
class Official:
    nodes: dict[int, dict[str, Any]]  # the subgraph's nodes and the outer graph's, by id
    links: dict[int, tuple[int, int]]  # link id -> (origin node, origin slot)
    lightning: bool  # which side of the preset switches to read

    def of_class(self, class_type: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes.values() if n["type"] == class_type]

    def classes(self) -> set[str]:
        return {n["type"] for n in self.nodes.values() if n["type"] not in UI_ONLY and "-" not in n["type"]}

    def model_files(self) -> dict[str, str]:
        """File name -> URL of every model a node names (`properties.models`)."""
        return {m["name"]: m["url"] for n in self.nodes.values() for m in n.get("properties", {}).get("models", [])}

    def widget(self, node: dict[str, Any], names: list[str], name: str) -> Any:
        """An input's value: through its link (primitives, preset switches) or the widget."""
        for entry in node.get("inputs", []):
            if entry["name"] == name and entry.get("link") is not None:
                return self._value(entry["link"])
        return node["widgets_values"][names.index(name)]

    def _value(self, link: int) -> Any:
        if self.links[link][0] < 0:
            return None  # fed by the subgraph's own inputs (seed, prompt): set per request
        origin = self.nodes[self.links[link][0]]
        if origin["type"] == "ComfySwitchNode":
            side = "on_true" if self.lightning else "on_false"
            [entry] = [e for e in origin["inputs"] if e["name"] == side]
            return self._value(entry["link"])
        return origin["widgets_values"][0]

    def model_chain(self, node: dict[str, Any]) -> list[str]:
        """Classes from a sampler's `model` input back to its loader (preset switches resolved)."""
        chain = []
        while True:
            [entry] = [e for e in node["inputs"] if e["name"] in ("model", "on_true" if self.lightning else "on_false")]
            node = self.nodes[self.links[entry["link"]][0]]
            if node["type"] != "ComfySwitchNode":
                chain.append(node["type"])
            if node["type"] == "UNETLoader":
                return chain


@functools.cache
def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("comfyui_workflow_templates_json").joinpath("templates", name).read_text())
    return data


def official(name: str, lightning: bool) -> Official:
    data = _load(name)
    [subgraph] = data["definitions"]["subgraphs"]
    nodes = {n["id"]: n for n in data["nodes"] + subgraph["nodes"]}
    links = {link["id"]: (link["origin_id"], link["origin_slot"]) for link in subgraph["links"]}
    return Official(nodes, links, lightning)


def our_model_nodes(graph: dict[str, Any], sampler: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes from one of our samplers' `model` input back to its loader."""
    nodes = []
    node = sampler
    while node["class_type"] != "UNETLoader":
        node = graph[node["inputs"]["model"][0]]
        nodes.append(node)
    return nodes


def our_model_chain(graph: dict[str, Any], sampler: dict[str, Any]) -> list[str]:
    return [node["class_type"] for node in our_model_nodes(graph, sampler)]
