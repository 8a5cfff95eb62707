"""Graphs as data: API-format templates from the repository's `workflows/` folder, and the
few structural edits builders make to them.

A template is a graph ComfyUI could run as it is. Each node carries a slot name in
`_meta.title` (ComfyUI ignores `_meta`; its own API export writes titles there), so builders
address nodes by role ("sampler_high") rather than by id, and a template can be renumbered
without touching code.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from .base import Graph

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"

Link = list[Any]  # [node id, output index], as ComfyUI's API format writes a connection


@functools.cache
def _read(name: str) -> Graph:
    graph: Graph = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    return graph


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class GraphBuilder:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._ids = {_title(node): node_id for node_id, node in graph.items()}

    @classmethod
    def from_template(cls, name: str) -> GraphBuilder:
        return cls(copy.deepcopy(_read(name)))

    def id(self, title: str) -> str:
        try:
            return self._ids[title]
        except KeyError:
            raise KeyError(f"no node titled {title!r} in the graph") from None

    def out(self, title: str, index: int = 0) -> Link:
        """A link to output `index` of the node titled `title`."""
        return [self.id(title), index]

    def inputs(self, title: str) -> dict[str, Any]:
        inputs: dict[str, Any] = self.graph[self.id(title)]["inputs"]
        return inputs

    def set(self, title: str, **inputs: Any) -> None:
        self.inputs(title).update(inputs)

    def add(self, class_type: str, title: str, **inputs: Any) -> Link:
        """Add a node under the next free id; returns a link to its first output."""
        node_id = str(max((int(i) for i in self.graph if i.isdigit()), default=0) + 1)
        self._put(node_id, class_type, title, inputs)
        return [node_id, 0]

    def retype(self, title: str, class_type: str) -> None:
        """Swap a node's class for one with the same outputs (links to it stay valid)."""
        self.graph[self.id(title)]["class_type"] = class_type

    def _put(self, node_id: str, class_type: str, title: str, inputs: dict[str, Any]) -> None:
        if node_id in self.graph or title in self._ids:
            raise ValueError(f"node {node_id} ({title}) is already in the graph")
        self.graph[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        self._ids[title] = node_id

    def bypass(self, title: str, through: str) -> None:
        """Remove a pass-through node (a LoRA loader, say): whatever read its first output
        reads what fed its input `through` instead."""
        node_id = self.id(title)
        source = self.graph[node_id]["inputs"][through]
        for node in self.graph.values():
            for name, value in node["inputs"].items():
                if is_link(value) and value == [node_id, 0]:
                    node["inputs"][name] = list(source)
        del self.graph[node_id]
        del self._ids[title]

    def merge(self, name: str, id_offset: int, suffix: str, local_from: int) -> list[str]:
        """Add a copy of template `name`, a fragment whose node ids from `local_from` up are
        its own (renumbered by `id_offset`, titles suffixed) and whose lower ids refer to nodes
        already in this graph. Returns the new nodes' ids."""
        added = []
        for node_id, node in _read(name).items():
            new = copy.deepcopy(node)
            for key, value in new["inputs"].items():
                if is_link(value) and int(value[0]) >= local_from:
                    new["inputs"][key] = [str(int(value[0]) + id_offset), value[1]]
            added.append(str(int(node_id) + id_offset))
            self._put(added[-1], new["class_type"], _title(node) + suffix, new["inputs"])
        return added


def _title(node: dict[str, Any]) -> str:
    return str(node.get("_meta", {}).get("title", ""))
