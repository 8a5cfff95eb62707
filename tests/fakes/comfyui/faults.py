"""Fault injection for the fake ComfyUI, and a tiny client for tests.

Control routes (real ComfyUI has none of them; they bypass every fault):

    POST   /__fake__/fault   {"kind": K, "when": {...}, "duration_s": S}  -> 200 {"armed": {...}}
    POST   /__fake__/fault   {"kind": "clear"}  (or DELETE /__fake__/fault) -> 200 {"armed": []}
    GET    /__fake__/fault                                                 -> 200 {"armed": [...], "active": [...]}
    POST   /__fake__/config  {"step_delay_s": 0.05, ...}                   -> 200 {config}
    GET    /__fake__/config                                                -> 200 {config}

Kinds:
    die           the process exits with code 3 (os._exit), after the messages already queued went out
    drop_ws       every WebSocket is cut (TCP reset; {"graceful": true} in `when` sends a close frame);
                  execution goes on, a reconnect with the same clientId gets the rest
    hang          HTTP stops answering (requests wait, the listener still accepts); a job that hits
                  it stalls too; lasts until cleared or duration_s
    garbage_http  every HTTP answer is 200 with a non-JSON body; until cleared or duration_s
    refuse        the listening socket closes: new connections are refused; open sockets live on;
                  listening again after duration_s (without one it stays down)

`when` (all keys optional; an empty `when` fires at once):
    {"on": "post"}          at the next POST /prompt, before it is validated
    {"on": "prompt"}        when the next prompt starts executing (after execution_cached); "next_prompt" too
    {"node_class": "KSampler"} / {"node_id": "5"}   when such a node starts (after its `executing`)
    ... plus {"step": 2}    at that node's progress step 2 (after `progress` value 2 went out)
    {"prompt_id": "..."}    only for that prompt
A fault fires once and is disarmed.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("die", "drop_ws", "hang", "garbage_http", "refuse")
STAGES = ("now", "post", "prompt", "node", "step")
_WHEN_KEYS = {"on", "node_class", "node_id", "step", "prompt_id", "graceful"}


@dataclass(frozen=True)
class FaultPoint:
    """A place in the server's life where armed faults are checked."""

    stage: str  # "post" | "prompt" | "node" | "step"
    prompt_id: str | None = None
    node_id: str | None = None
    node_class: str | None = None
    step: int | None = None


@dataclass
class Fault:
    kind: str
    when: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None
    id: int = 0

    @property
    def stage(self) -> str:
        on = self.when.get("on")
        if on is not None:
            return "prompt" if on == "next_prompt" else str(on)
        if "step" in self.when:
            return "step"
        if "node_class" in self.when or "node_id" in self.when:
            return "node"
        if "prompt_id" in self.when:
            return "prompt"
        return "now"

    def matches(self, point: FaultPoint) -> bool:
        if self.stage != point.stage:
            return False
        w = self.when
        if "prompt_id" in w and w["prompt_id"] != point.prompt_id:
            return False
        if "node_class" in w and w["node_class"] != point.node_class:
            return False
        if "node_id" in w and str(w["node_id"]) != point.node_id:
            return False
        return not ("step" in w and int(w["step"]) != point.step)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "when": self.when, "duration_s": self.duration_s,
                "stage": self.stage}


def parse_fault(body: Any) -> Fault:
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    kind = body.get("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)} (or 'clear'), not {kind!r}")
    when = body.get("when") or {}
    if not isinstance(when, dict):
        raise ValueError("'when' must be an object")
    unknown = set(when) - _WHEN_KEYS
    if unknown:
        raise ValueError(f"unknown 'when' keys: {sorted(unknown)}")
    duration = body.get("duration_s")
    if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
        raise ValueError("'duration_s' must be a positive number")
    fault = Fault(kind=kind, when=dict(when), duration_s=float(duration) if duration is not None else None)
    if fault.stage not in STAGES:
        raise ValueError(f"'on' must be one of post, prompt, next_prompt, not {when.get('on')!r}")
    if fault.stage == "step" and "node_class" not in when and "node_id" not in when:
        raise ValueError("'step' needs 'node_class' or 'node_id'")
    return fault


class FaultBook:
    """The armed faults; checked from the HTTP handlers and the execution thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[Fault] = []
        self._next_id = 1

    def arm(self, fault: Fault) -> Fault:
        with self._lock:
            fault.id = self._next_id
            self._next_id += 1
            self._armed.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def take(self, point: FaultPoint) -> list[Fault]:
        with self._lock:
            hit = [f for f in self._armed if f.matches(point)]
            self._armed = [f for f in self._armed if f not in hit]
        return hit

    def armed(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.as_dict() for f in self._armed]


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


def _call(url: str, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None


def set_fault(url: str, kind: str, *, duration_s: float | None = None, **when: Any) -> dict[str, Any]:
    """Arm a fault: set_fault(url, "die", node_class="KSampler", step=2), set_fault(url, "hang",
    duration_s=1.0), set_fault(url, "drop_ws", on="prompt")."""
    body: dict[str, Any] = {"kind": kind, "when": when}
    if duration_s is not None:
        body["duration_s"] = duration_s
    return dict(_call(url, "POST", "/__fake__/fault", body)["armed"])


def clear_faults(url: str) -> None:
    """Disarm every fault and end hang / garbage_http / refuse states that are active."""
    _call(url, "POST", "/__fake__/fault", {"kind": "clear"})


def get_faults(url: str) -> dict[str, Any]:
    return dict(_call(url, "GET", "/__fake__/fault"))


def set_config(url: str, **config: Any) -> dict[str, Any]:
    """set_config(url, step_delay_s=0.05): see FakeConfig in server.py for the keys."""
    return dict(_call(url, "POST", "/__fake__/config", config))


def get_config(url: str) -> dict[str, Any]:
    return dict(_call(url, "GET", "/__fake__/config"))
