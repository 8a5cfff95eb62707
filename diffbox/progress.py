"""Progress of one job as the DESIGN.md section 4 payload.

Percent is weighted by where the time goes: sampler steps dominate, model loading and VAE
work count too, the rest is cheap. It only ever rises, and updates are throttled (one a
second plus every change of stage). Each payload carries `seq`, increasing within the job,
because the RunPod SDK sends each update from its own thread and they can arrive out of order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .schemas import Progress
from .throttle import Throttle

Emit = Callable[[dict[str, Any]], None]

# Stage bands of the percent scale; running gets nearly all of it. A stopped job's last update
# (STOPPED) keeps the percent where it stopped.
_BANDS = {"starting": (0.0, 2.0), "inputs": (2.0, 3.0), "downloading": (3.0, 4.0), "queued": (4.0, 5.0),
          "running": (5.0, 95.0), "uploading": (95.0, 99.0), "cancelled": (0.0, 0.0), "timeout": (0.0, 0.0)}
STOPPED = ("cancelled", "timeout")
STEP_WEIGHT = 1.0
DEFAULT_STEPS = 20
# Relative cost in "sampler steps" of the node classes that are not samplers.
_CLASS_WEIGHTS = (("Loader", 2.0), ("VAEDecode", 3.0), ("VAEEncode", 1.0), ("SaveVideo", 1.0))
_OTHER_WEIGHT = 0.1


def node_weight(node: dict[str, Any]) -> float:
    inputs = node.get("inputs", {})
    if "steps" in inputs:
        steps = inputs["steps"] if isinstance(inputs["steps"], int) else DEFAULT_STEPS
        start = inputs.get("start_at_step", 0)
        end = inputs.get("end_at_step", steps)
        if isinstance(start, int) and isinstance(end, int):
            steps = max(min(end, steps) - start, 1)
        return steps * STEP_WEIGHT
    class_type = str(node.get("class_type", ""))
    for marker, weight in _CLASS_WEIGHTS:
        if marker in class_type:
            return weight
    return _OTHER_WEIGHT


class ProgressTracker:
    def __init__(
        self,
        emit: Emit,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._clock = clock
        self._throttle = Throttle(interval_s, clock)
        self._t0 = clock()
        self._lock = threading.Lock()
        self._seq = 0
        self._percent = 0.0
        self._stage = "starting"
        self._graph: dict[str, dict[str, Any]] = {}
        self._weights: dict[str, float] = {}
        self._total = 1.0
        self._done: set[str] = set()
        self._node_fraction: dict[str, float] = {}
        self._node_clip: dict[str, int] = {}
        self._clips = 0
        self._run_t0: float | None = None
        self._detail: dict[str, Any] = {}
        # The sampler node whose steps are coming in: a new one is news worth an update at once
        # (a few quick steps would otherwise all fall inside one throttle interval, unseen).
        self._sampling: str | None = None
        self._executing: str | None = None

    def set_graph(self, graph: dict[str, dict[str, Any]], node_clip: dict[str, int] | None = None,
                  clips: int = 0) -> None:
        self._graph = graph
        self._weights = {node_id: node_weight(node) for node_id, node in graph.items()}
        self._total = sum(self._weights.values()) or 1.0
        self._node_clip = node_clip or {}
        self._clips = clips

    def stage(self, stage: str, fraction: float = 0.0) -> None:
        with self._lock:
            if stage == "running" and self._run_t0 is None:
                self._run_t0 = self._clock()
            self._stage = stage
            self._detail = {}
            self._sampling = None
            self._update(fraction)

    def downloaded(self, done: int, total: int | None) -> None:
        """Bytes of the file the downloading stage is fetching (a request's LoRA)."""
        with self._lock:
            self._detail = {"bytes": done, "total": total}
            self._update(done / total if total else 0.0)

    def on_message(self, kind: str, data: dict[str, Any]) -> None:
        """Feed one ComfyUI WebSocket message of this job's prompt."""
        with self._lock:
            if kind == "execution_start":
                self._stage = "running"
                self._run_t0 = self._clock()
            elif kind == "execution_cached":
                self._done.update(str(n) for n in data.get("nodes", []))
            elif kind == "progress_state":
                for node_id, state in (data.get("nodes") or {}).items():
                    if state.get("state") == "finished":
                        self._done.add(str(node_id))
            elif kind == "executing" and data.get("node") is not None:
                node_id = str(data["node"])
                # ComfyUI runs one node at a time: the one before has ended. (Its progress_state
                # says so too, but the worker reads only some of those; see comfyui_job.py.)
                if self._executing is not None:
                    self._done.add(self._executing)
                self._executing = node_id
                self._detail = self._describe(node_id)
            elif kind == "progress":
                node_id = str(data.get("node"))
                value, maximum = data.get("value", 0), data.get("max", 0) or 1
                self._node_fraction[node_id] = min(value / maximum, 1.0)
                self._detail = {**self._describe(node_id), "step": value, "steps": maximum}
                self._sampling = node_id
            else:
                return
            self._update(self._running_fraction())

    def _describe(self, node_id: str) -> dict[str, Any]:
        detail: dict[str, Any] = {"node": self._graph.get(node_id, {}).get("class_type")}
        if node_id in self._node_clip:
            detail.update(clip=self._node_clip[node_id], clips=self._clips)
        return detail

    def _running_fraction(self) -> float:
        done = sum(w for n, w in self._weights.items() if n in self._done)
        partial = sum(
            self._weights.get(n, 0.0) * f for n, f in self._node_fraction.items() if n not in self._done
        )
        return min((done + partial) / self._total, 1.0)

    def _update(self, fraction: float) -> None:
        low, high = _BANDS[self._stage]
        self._percent = max(self._percent, low + (high - low) * fraction)
        if not self._throttle.allow((self._stage, self._sampling)):
            return
        self._seq += 1
        now = self._clock()
        eta = None
        if self._stage == "running" and self._run_t0 is not None and 0.05 <= fraction < 1.0:
            ran = now - self._run_t0
            eta = round(ran / fraction * (1.0 - fraction), 1)
        payload = Progress(
            seq=self._seq,
            stage=self._stage,
            percent=round(self._percent, 1),
            elapsed_s=round(now - self._t0, 2),
            eta_s=eta,
            **self._detail,
        )
        self._emit(payload.model_dump(exclude_none=True))
