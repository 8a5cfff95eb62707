"""Run one prompt on ComfyUI to its end, over the WebSocket.

The socket is connected before the prompt is posted (ComfyUI sends execution messages only
to the submitting client), only messages of our prompt count, and the job ends on
`execution_error`, `execution_interrupted`, or `executing {node: null}` (the only point
after which `/history` is guaranteed). A dropped socket is reconnected and the state
reconciled from `/history`, so a lost message never hangs a job. Stopping (cancel or
timeout) dequeues or interrupts our own prompt only.

A socket outlives its job (`IdleSockets`): opening one costs a connection and a handshake
on every job, and one socket per worker carries every prompt's messages, told apart by
prompt id. A job whose socket never dropped has seen every message of its prompt, its
outputs included, so it does not read `/history` back on success.
"""

from __future__ import annotations

import json
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import requests
import websocket

from .. import logs
from ..errors import JobError, backend
from .comfyui import ComfyClient
from .node_times import NodeTimes
from .process import Supervisor

log = logs.get("comfyui")
RECV_POLL_S = 0.25
# Without any message for this long we ask /history: cheap insurance against a lost message.
RECONCILE_AFTER_S = 5.0
RECONNECT_FOR_S = 15.0
# An interrupt takes effect only between nodes: a node that never checks runs to its end first,
# and ComfyUI prepares its caches for the whole graph before the first node, checking nothing
# (12 s to 32 s for a 600-node chain on a 2-core CPU). A stopped job waits this long for ComfyUI to
# confirm, then ends anyway: its prompt is handed over (`disown`) to the next job, which stops
# it again and lets its files and LoRA pins go once it has left ComfyUI.
STOP_GRACE_S = 3.0
# ComfyUI sends `progress_state`, the state of every node begun so far, as each node starts and
# ends: bytes that grow with the square of a graph's size (72 MB over a 600-node chain), more
# than this worker parses as fast as ComfyUI sends them, which left a backlog between a stop and
# the message saying it took effect. Each one supersedes the one before, so one is read in this
# interval and the others are skipped unparsed (recognized by how ComfyUI's json.dumps begins one;
# should that ever change, every message is parsed, as before).
STATE_PREFIX = '{"type": "progress_state"'
STATE_EVERY_S = 0.25

OnMessage = Callable[[str, dict[str, Any]], None]
OnOutput = Callable[[str, dict[str, Any]], None]
# Invalid UTF-8 on the socket is a broken socket like any other (see `connect`).
SOCKET_ERRORS = (OSError, websocket.WebSocketException, UnicodeDecodeError)


def connect(url: str) -> websocket.WebSocket:
    # ComfyUI's messages are JSON it encoded itself: websocket-client's UTF-8 check, in pure
    # Python byte by byte, cost more than the rest of a small job's message handling.
    ws = websocket.create_connection(url, timeout=10, skip_utf8_validation=True)
    ws.settimeout(RECV_POLL_S)
    return ws


class IdleSockets:
    """WebSockets to ComfyUI between jobs, with the client id each was opened under."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._idle: list[tuple[str, websocket.WebSocket]] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[str, websocket.WebSocket] | None:
        """An open socket with nothing left to read from earlier jobs, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                client_id, ws = self._idle.pop()
            if _drained(ws):
                return client_id, ws
            ws.close()

    def give(self, client_id: str, ws: websocket.WebSocket) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append((client_id, ws))
                return
        ws.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, ws in idle:
            ws.close()


def _drained(ws: websocket.WebSocket) -> bool:
    """Read what arrived while the socket was idle (broadcasts, late messages of earlier
    prompts); False when the server closed or broke it meanwhile."""
    sock = ws.sock
    if sock is None:
        return False
    try:
        while select.select([sock], [], [], 0)[0]:
            if ws.recv() == "":  # a close frame (ComfyUI's text messages are never empty)
                return False
    except (*SOCKET_ERRORS, ValueError, TypeError):
        return False
    return bool(ws.connected)


@dataclass
class Outcome:
    prompt_id: str
    status: Literal["success", "error", "interrupted"]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    # ComfyUI's own clock (ms) for the execution, so overhead can be told from inference.
    exec_start_ms: int | None = None
    exec_end_ms: int | None = None
    started_at: float | None = None  # monotonic, when execution_start arrived
    cached: frozenset[str] = frozenset()  # nodes whose outputs ComfyUI reused instead of running them


class PromptRun:
    ws: websocket.WebSocket

    def __init__(
        self,
        client: ComfyClient,
        supervisor: Supervisor,
        stop: threading.Event,
        deadline: float,
        on_message: OnMessage,
        on_output: OnOutput,
        abort: threading.Event | None = None,
        sockets: IdleSockets | None = None,
    ) -> None:
        self.client = client
        self.supervisor = supervisor
        self.stop = stop
        # Set by the job itself when the run can no longer succeed (its outputs cannot be
        # stored): the prompt is stopped at once instead of burning GPU time to its end.
        self.abort = abort or threading.Event()
        self.deadline = deadline
        self.on_message = on_message
        self.on_output = on_output
        self.sockets = sockets
        self.client_id = uuid.uuid4().hex
        self.prompt_id = str(uuid.uuid4())
        # Whether ComfyUI said our prompt ended (or never ran): until then it may still be
        # queued or running there, whatever became of this job.
        self.finished = False
        self.stop_reason: Literal["cancelled", "aborted", "timeout"] | None = None
        self._stop_sent_at: float | None = None
        self._exec_start_ms: int | None = None
        self._exec_end_ms: int | None = None
        self._started_at: float | None = None
        self._cached: frozenset[str] = frozenset()
        self._seen_outputs: dict[str, dict[str, Any]] = {}
        self._dropped = False  # the socket dropped once: messages may have been lost
        self._state_read_at = float("-inf")
        self.node_times = NodeTimes({})

    def run(self, graph: dict[str, Any]) -> Outcome:
        self.node_times = NodeTimes(graph)
        taken = self.sockets.take() if self.sockets is not None else None
        if taken is not None:
            self.client_id, self.ws = taken
        else:
            self.ws = self._connect()
        reusable = False
        try:
            try:
                prompt_id = self.client.queue_prompt(graph, self.client_id, self.prompt_id)
            except JobError:
                self.finished = True  # refused: it never entered the queue
                reusable = True
                raise
            except requests.RequestException as exc:
                lost(self.supervisor, exc)
            logs.event(log, "prompt queued", prompt_id=prompt_id)
            outcome = self._follow(prompt_id)
            reusable = True
            return outcome
        finally:
            if reusable and self.sockets is not None:
                self.sockets.give(self.client_id, self.ws)
            else:
                self.ws.close()

    def _connect(self) -> websocket.WebSocket:
        try:
            return connect(f"{self.client.ws_url}?clientId={self.client_id}")
        except (OSError, websocket.WebSocketException) as exc:
            lost(self.supervisor, exc)

    def _follow(self, prompt_id: str) -> Outcome:
        last_message = time.monotonic()
        while True:
            if self.stop_reason is None and (reason := self._stop_reason()) is not None:
                self.stop_reason = reason
                if self._send_stop(prompt_id):
                    return self._outcome(prompt_id, "interrupted")
            if self._stop_sent_at is not None and time.monotonic() - self._stop_sent_at > STOP_GRACE_S:
                return self._outcome(prompt_id, "interrupted", confirmed=False)
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                self.supervisor.raise_if_exited("during the job")
                if time.monotonic() - last_message > RECONCILE_AFTER_S:
                    last_message = time.monotonic()
                    if (done := self._reconcile(prompt_id)) is not None:
                        return done
                continue
            except SOCKET_ERRORS:
                logs.event(log, "websocket dropped, reconnecting", prompt_id=prompt_id)
                self._dropped = True
                self.ws = self._reconnect(self.ws)
                if (done := self._reconcile(prompt_id)) is not None:
                    return done
                continue
            last_message = time.monotonic()
            if isinstance(raw, bytes):
                continue  # preview frames: not part of any result
            if raw.startswith(STATE_PREFIX):
                if last_message - self._state_read_at < STATE_EVERY_S:
                    continue
                self._state_read_at = last_message
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if (done := self._handle(prompt_id, kind, data)) is not None:
                return done

    def _stop_reason(self) -> Literal["cancelled", "aborted", "timeout"] | None:
        if self.stop.is_set():
            return "cancelled"
        if self.abort.is_set():
            return "aborted"
        return "timeout" if time.monotonic() > self.deadline else None

    def _handle(self, prompt_id: str, kind: str, data: dict[str, Any]) -> Outcome | None:
        self.on_message(kind, data)
        self.node_times.on_message(kind, data)
        if kind == "execution_start":
            self._exec_start_ms = data.get("timestamp")
            self._started_at = time.monotonic()
        elif kind == "execution_cached":
            self._cached = frozenset(str(n) for n in data.get("nodes") or ())
        elif kind == "executed" and data.get("node") is not None:
            self._seen_outputs[str(data["node"])] = data.get("output") or {}
            self.on_output(str(data["node"]), data.get("output") or {})
        elif kind == "execution_success":
            self._exec_end_ms = data.get("timestamp")
        elif kind == "execution_error":
            self._exec_end_ms = data.get("timestamp")
            return self._outcome(prompt_id, "error", data)
        elif kind == "execution_interrupted":
            self._exec_end_ms = data.get("timestamp")
            return self._outcome(prompt_id, "interrupted")
        elif kind == "executing" and data.get("node") is None:
            # Every message reached us: the outputs are the `executed` ones (ComfyUI sends
            # one for a cached output node too), just what /history would list.
            seen = None if self._dropped else {"outputs": dict(self._seen_outputs)}
            return self._outcome(prompt_id, "success", entry=seen)
        return None

    def _outcome(self, prompt_id: str, status: Literal["success", "error", "interrupted"],
                 error: dict[str, Any] | None = None, confirmed: bool = True,
                 entry: dict[str, Any] | None = None) -> Outcome:
        logs.event(log, "prompt ended", level=logging.DEBUG, prompt_id=prompt_id, status=status, confirmed=confirmed)
        self.node_times.log(prompt_id)
        if entry is None:
            entry = self._history(prompt_id, wait=status == "success")
        self.finished = confirmed
        outputs = (entry or {}).get("outputs") or {}
        # Outputs that finished before a failure or interrupt still count (svi partial clips),
        # and any that arrived only in /history (after a reconnect) are announced now.
        for node, output in outputs.items():
            if node not in self._seen_outputs:
                self._seen_outputs[node] = output
                self.on_output(node, output)
        return Outcome(
            prompt_id=prompt_id,
            status=status,
            outputs=outputs,
            error=error,
            exec_start_ms=self._exec_start_ms,
            exec_end_ms=self._exec_end_ms,
            started_at=self._started_at,
            cached=self._cached,
        )

    def _history(self, prompt_id: str, wait: bool) -> dict[str, Any] | None:
        for _ in range(20 if wait else 1):
            try:
                entry = self.client.history(prompt_id)
            except (requests.RequestException, ValueError) as exc:
                lost(self.supervisor, exc)
            if entry is not None or not wait:
                return entry
            time.sleep(0.05)
        raise backend(f"ComfyUI finished prompt {prompt_id} but kept no history of it")

    def _reconcile(self, prompt_id: str) -> Outcome | None:
        """What /history says of our prompt, once it has ended; None while it runs."""
        entry = self._history(prompt_id, wait=False)
        if entry is None:
            return None
        status = entry.get("status") or {}
        messages = {m[0]: m[1] for m in status.get("messages", []) if isinstance(m, list) and len(m) == 2}
        self._exec_start_ms = self._exec_start_ms or messages.get("execution_start", {}).get("timestamp")
        cached = messages.get("execution_cached", {}).get("nodes") or ()
        self._cached = self._cached or frozenset(str(n) for n in cached)
        if "execution_error" in messages:
            return self._outcome(prompt_id, "error", messages["execution_error"], entry=entry)
        if "execution_interrupted" in messages:
            return self._outcome(prompt_id, "interrupted", entry=entry)
        if status.get("completed") or status.get("status_str") == "success":
            self._exec_end_ms = messages.get("execution_success", {}).get("timestamp")
            return self._outcome(prompt_id, "success", entry=entry)
        return None

    def _reconnect(self, old: websocket.WebSocket) -> websocket.WebSocket:
        old.close()
        t0 = time.monotonic()
        while True:
            self.supervisor.raise_if_exited("during the job")
            try:
                return self._connect()
            except JobError:
                if time.monotonic() - t0 > RECONNECT_FOR_S:
                    raise
                time.sleep(0.5)

    def _send_stop(self, prompt_id: str) -> bool:
        """Dequeue or interrupt our prompt; True when it will never run (no messages follow)."""
        self._stop_sent_at = time.monotonic()
        logs.event(log, "stopping prompt", prompt_id=prompt_id, reason=self.stop_reason)
        try:
            for _ in range(3):
                running, pending = self.client.queue()
                if prompt_id in pending:
                    self.client.delete_queued(prompt_id)
                    continue  # it may have started meanwhile: look again
                if prompt_id in running:
                    self.client.interrupt(prompt_id)
                    return False
                return True  # already deleted, or already ended
        except (requests.RequestException, ValueError) as exc:
            lost(self.supervisor, exc)
        return False


def lost(supervisor: Supervisor, exc: Exception) -> NoReturn:
    """A request to ComfyUI failed: its exit (code and log tail) when it has exited, else a
    backend error; either way it is probed again before the next job trusts it."""
    supervisor.mark_unready()
    supervisor.raise_if_exited("during the job")
    raise backend(f"lost the connection to ComfyUI: {type(exc).__name__}") from exc
