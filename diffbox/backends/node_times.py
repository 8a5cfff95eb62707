"""How long each node of a prompt ran, from ComfyUI's `executing` messages (one node runs at a
time: a node ends when the next begins). Logged at DEBUG when the prompt ends, it shows where a
job's time went: a loader's time is its weight file's load, and the loaders' order is the order
in which ComfyUI reads the files (which the prefetch follows: workflows/README.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .. import logs

log = logs.get("comfyui")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def loaded_file(node: dict[str, Any]) -> str | None:
    """The weight file a loader node names among its inputs, if it is one."""
    for value in (node.get("inputs") or {}).values():
        if isinstance(value, str) and value.lower().endswith(WEIGHT_SUFFIXES):
            return value
    return None


class NodeTimes:
    def __init__(self, graph: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._graph = graph
        self._clock = clock
        self._running: tuple[str, float] | None = None
        self.seconds: list[tuple[str, float]] = []

    def on_message(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("executing", "execution_success", "execution_error", "execution_interrupted"):
            now = self._clock()
            if self._running is not None:
                self.seconds.append((self._running[0], round(now - self._running[1], 3)))
            following = data.get("node") if kind == "executing" else None
            self._running = (str(following), now) if following is not None else None

    def entries(self) -> list[dict[str, Any]]:
        entries = []
        for node_id, seconds in self.seconds:
            node = self._graph.get(node_id) or {}
            entry = {"node": node_id, "class": node.get("class_type"), "s": seconds}
            if (name := loaded_file(node)) is not None:
                entry["file"] = name
            entries.append(entry)
        return entries

    def log(self, prompt_id: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            logs.event(log, "prompt node times", level=logging.DEBUG, prompt_id=prompt_id, nodes=self.entries())
