"""A request's own LoRAs in its graph: one `LoraLoaderModelOnly` per LoRA and model, between the
preset's model chain and the node that reads it (after the preset's own LoRAs).

Which file each loader names is known only once the worker has fetched it (the cache names
files by sha256), so plans carry a placeholder and the loaders' ids; `bind` fills in the names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..loras.request import LoraEntry
from .base import Graph
from .graph import GraphBuilder


def placeholder(index: int) -> str:
    return f"diffbox-cache/<sha256 of loras[{index}]>.safetensors"


def add_loras(b: GraphBuilder, entries: Sequence[LoraEntry], taps: Mapping[str, str]) -> dict[str, int]:
    """Insert the entries' loaders in front of the `model` input of each tap their target names
    (`taps`: target -> node title; an entry without a target goes to every tap). Returns
    loader node id -> entry index."""
    nodes: dict[str, int] = {}
    for index, entry in enumerate(entries):
        for target, tap in taps.items():
            if entry.target not in (None, "both", target):
                continue
            title = f"user_lora{index}" + (f"_{target}" if len(taps) > 1 else "")
            loader = b.add("LoraLoaderModelOnly", title, model=b.inputs(tap)["model"],
                           lora_name=placeholder(index), strength_model=entry.strength)
            b.set(tap, model=loader)
            nodes[loader[0]] = index
    return nodes


def bind(graph: Graph, nodes: Mapping[str, int], names: Sequence[str]) -> None:
    """Point each loader at its entry's file in the cache."""
    for node_id, index in nodes.items():
        graph[node_id]["inputs"]["lora_name"] = names[index]
