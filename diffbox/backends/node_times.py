"""How long each node of a prompt ran, from ComfyUI's `executing` messages (one node runs at a
time: a node ends when the next begins). Logged at DEBUG when the prompt ends, it shows where a
job's time went: a weight file's load is its loader node's time (bench/cold_start.py reads it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .. import logs

log = logs.get("comfyui")


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

    def log(self, prompt_id: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            nodes = [[node, (self._graph.get(node) or {}).get("class_type"), seconds] for node, seconds in self.seconds]
            logs.event(log, "prompt node times", level=logging.DEBUG, prompt_id=prompt_id, nodes=nodes)
