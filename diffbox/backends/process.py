"""Supervise one backend server subprocess (ComfyUI or vLLM).

Start it (non-blocking, so several backends start in parallel), wait for readiness with a
bound, notice when it has exited (exit code and the tail of its log are what a user needs to
act), and start a fresh one for the next job. Attached servers (a URL given instead of a
command) go through the same readiness path with no process to manage.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import logs
from ..errors import JobError

log = logs.get("process")
TAIL_LINES = 40
# A server that answered once and now has not for this long, its process alive, is hung (a
# deadlocked node, a wedged driver): it is restarted, or every later job would wait for it.
HUNG_AFTER_S = 60.0
# Words in the names of variables that carry credentials (AWS_SECRET_ACCESS_KEY, HF_TOKEN,
# CIVITAI_TOKEN, a secret's own names): a name with none of them is not recognized as one.
CREDENTIAL_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")


class ServerProcess:
    """One subprocess and the last lines it printed."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self._popen: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._held = threading.Event()
        self._ready_line: str | None = None

    def start(self) -> None:
        self._spawn(self.argv)

    def hold(self, script: Path, ready: str, timeout_s: float) -> bool:
        """Start the server's first half: the same interpreter running `script` in front of the
        server's own arguments, with no GPU visible, until `release` (comfyui_preload.py).
        True once `script` printed `ready`; otherwise (it exited, or took longer) the process
        is stopped and False returned, and `start` will start the server the ordinary way."""
        self._held.clear()
        self._ready_line = ready
        self._spawn([self.argv[0], str(script), *self.argv[1:]], hold=True)
        t0 = time.monotonic()
        while not self._held.wait(0.1):
            if self.returncode() is not None or time.monotonic() - t0 > timeout_s:
                logs.event(log, "backend preload failed", level=30, backend=self.name, code=self.returncode(),
                           tail=self.tail()[-500:])
                self.stop(grace_s=2)
                self._popen = None
                return False
        logs.event(log, "backend preloaded", backend=self.name, seconds=logs.since(t0))
        return True

    def release(self) -> None:
        """Let a held server run its second half, in this process's environment as it is now
        (after a restore: this container's, not the snapshot's)."""
        if self._popen is None or self._popen.stdin is None:
            return
        with contextlib.suppress(OSError):  # it died: the supervisor sees the exit code
            self._popen.stdin.write(json.dumps(self._environment()).encode() + b"\n")
            self._popen.stdin.close()
        self._popen.stdin = None

    def _spawn(self, argv: list[str], hold: bool = False) -> None:
        # A restart after a crash: the children of the last run can outlive their leader
        # (vLLM's engine core does, holding gigabytes of memory) and must go first.
        self._kill_group()
        self._tail.clear()
        env = self._environment()
        if hold:
            # A held process is in the memory snapshot: no GPU, and no credential (it gets the
            # container's whole environment after the restore, from release()).
            env = {k: v for k, v in env.items() if not any(word in k.upper() for word in CREDENTIAL_WORDS)}
            env["CUDA_VISIBLE_DEVICES"] = ""
        # A new session makes the server and its children (vLLM spawns workers) one group
        # we can signal together, and keeps the worker's own Ctrl-C away from them.
        self._popen = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Its own process's pipe: `_popen` may be replaced (a restart) or cleared before it runs.
        self._reader = threading.Thread(target=self._read, args=(self._popen,), name=f"{self.name}-log", daemon=True)
        self._reader.start()
        logs.event(log, "backend started", backend=self.name, pid=self._popen.pid, held=hold)

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **(self.env or {})}

    def _read(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        for raw in popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line == self._ready_line:
                self._held.set()
            self._tail.append(line)
            logs.event(log, line, level=10, backend=self.name)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def returncode(self) -> int | None:
        """None while running (or never started), else the exit code."""
        return None if self._popen is None else self._popen.poll()

    def started(self) -> bool:
        return self._popen is not None

    def tail(self) -> str:
        # The reader thread may still be draining the pipe of a process that just exited.
        if self._reader is not None and self.returncode() is not None:
            self._reader.join(timeout=1)
        return "\n".join(self._tail)

    def stop(self, grace_s: float = 10.0) -> None:
        if self._popen is None:
            return
        if self._popen.poll() is None:
            pgid = self._popen.pid
            try:
                os.killpg(pgid, signal.SIGTERM)
                self._popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self._popen.wait()
            except ProcessLookupError:
                pass
            logs.event(log, "backend stopped", backend=self.name, code=self._popen.returncode)
        self._kill_group()

    def _kill_group(self) -> None:
        # Children that outlived the leader would keep the port (and memory); the group goes
        # with it. The group id cannot have been reused while any member is alive.
        if self._popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)


class Supervisor:
    """Readiness and restart policy for one backend, shared by ComfyUI and vLLM."""

    def __init__(self, name: str, probe: Callable[[], bool], process: ServerProcess | None,
                 probe_every_s: float = 0.25) -> None:
        self.name = name
        self.probe = probe
        # A job waiting for a starting server is sent within this of the server's first answer.
        self.probe_every_s = probe_every_s
        self.process = process
        self._lock = threading.Lock()
        self._ready = False
        self._answered = False  # this process answered a probe once (so silence means hung)

    def start(self) -> None:
        """Start the process without waiting (cold start launches every backend at once)."""
        with self._lock:
            if self.process is not None and not self.process.started():
                self.process.start()

    def ensure_ready(self, timeout_s: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Block until the backend answers; restart it first if it has exited since."""
        with self._lock:
            if self.process is not None:
                if not self.process.started():
                    self._restart()
                elif (code := self.process.returncode()) is not None:
                    logs.event(log, "backend had exited, restarting", backend=self.name, code=code)
                    self._restart()
            if self._ready:
                return
            t0 = time.monotonic()
            while True:
                self.raise_if_exited("while starting")
                if self.probe():
                    break
                if self.process is not None and self._answered and time.monotonic() - t0 > HUNG_AFTER_S:
                    logs.event(log, "backend stopped answering, restarting", level=30, backend=self.name,
                               silent_s=logs.since(t0))
                    self._restart()
                    t0 = time.monotonic()  # a fresh start gets the whole startup bound
                if cancelled():
                    raise JobError("cancelled", f"job cancelled while {self.name} was starting")
                if time.monotonic() - t0 > timeout_s:
                    raise JobError(
                        "timeout",
                        f"{self.name} did not become ready within {timeout_s:g} s "
                        "(DIFFBOX_STARTUP_TIMEOUT_S)",
                        {"log_tail": self.process.tail()} if self.process else None,
                    )
                time.sleep(self.probe_every_s)
            self._ready = self._answered = True
            logs.event(log, "backend ready", backend=self.name, wait_s=logs.since(t0))

    def _restart(self) -> None:
        assert self.process is not None
        self.process.start()  # ends what is left of the last run's process group first
        self._ready = self._answered = False

    def raise_if_exited(self, when: str) -> None:
        if self.process is None or (code := self.process.returncode()) is None:
            return
        self._ready = False
        raise JobError(
            "backend",
            f"{self.name} exited with code {code} {when}",
            {"exit_code": code, "log_tail": self.process.tail()},
        )

    def mark_unready(self) -> None:
        """After a connection failure: probe again before the next job trusts the server."""
        self._ready = False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self._ready = False
