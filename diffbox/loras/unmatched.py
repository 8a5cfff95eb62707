"""LoRA tensors that ComfyUI found no layer for, told to the caller.

ComfyUI's LoRA loader skips each tensor whose name maps onto no layer of the model and only
logs it (`lora key not loaded: NAME`, comfy/lora.py): a LoRA made for another model changes
nothing, silently. ComfyUI keeps its recent log lines in memory and serves them
(`GET /internal/logs/raw`), so the worker reads the lines its prompt added and counts, per
LoRA, the tensors named there. ComfyUI does not run a loader again while its inputs repeat
(its cache), so a verdict is remembered per LoRA file and base model for the worker's life.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .header import tensor_names

NOT_LOADED = re.compile(r"lora key not loaded: (\S+)")


LogEntries = list[tuple[str, str]]  # (time, text), as ComfyUI's /internal/logs/raw lists them


def last_entry(entries: LogEntries | None) -> tuple[str, str] | None:
    """Where a prompt's own log lines will start: after ComfyUI's newest entry now."""
    return entries[-1] if entries else None


def not_loaded_since(entries: LogEntries | None, mark: tuple[str, str] | None) -> set[str] | None:
    """The tensor names ComfyUI logged as not loaded after `mark` (None: its log is not readable).
    Its log keeps a few hundred entries: when the mark has gone, every entry counts."""
    if entries is None:
        return None
    if mark in entries:
        entries = entries[len(entries) - entries[::-1].index(mark):]
    return {m.group(1) for _, text in entries for m in NOT_LOADED.finditer(text)}


def chain_root(graph: Mapping[str, Any], node_id: str) -> str:
    """The model file at the start of `node_id`'s model chain (loaders pass `model` along)."""
    seen = set()
    while node_id not in seen:
        seen.add(node_id)
        inputs = graph[node_id].get("inputs", {})
        link = inputs.get("model")
        if not (isinstance(link, list) and link and str(link[0]) in graph):
            return str(inputs.get("unet_name") or inputs.get("ckpt_name") or graph[node_id].get("class_type"))
        node_id = str(link[0])
    return node_id


@dataclass
class Verdicts:
    """How many of a LoRA file's tensors matched no layer of a base model, by (file, model)."""

    known: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def judge(self, graph: Mapping[str, Any], loaders: Mapping[str, str], files: Mapping[str, Path],
              executed: Iterable[str], not_loaded: set[str] | None) -> dict[str, tuple[int, int]]:
        """(unmatched, tensors) per LoRA comfy name, from this prompt's log where its loader ran
        and from memory where ComfyUI reused a loader's output. `loaders`: node id -> comfy name."""
        ran = set(executed)
        out: dict[str, tuple[int, int]] = {}
        with self.lock:
            for node_id, name in loaders.items():
                key = (name, chain_root(graph, node_id))
                if node_id in ran and not_loaded is not None:
                    names = tensor_names(files[name])
                    self.known[key] = (len(not_loaded.intersection(names)), len(names))
                if key in self.known:
                    unmatched, total = self.known[key]
                    worst = out.get(name, (0, total))
                    out[name] = (max(worst[0], unmatched), total)
        return out


def warning(index: int, source: str, unmatched: int, total: int) -> str:
    if unmatched >= total:
        return (f"loras[{index}] ({source}): ComfyUI found no layer of the model for any of its {total} tensors "
                "and ignored the LoRA: is it a LoRA for this model?")
    return (f"loras[{index}] ({source}): ComfyUI found no layer of the model for {unmatched} of its {total} "
            "tensors and ignored those")
