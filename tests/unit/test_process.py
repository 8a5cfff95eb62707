"""The backend supervisor against small scripts standing in for ComfyUI and vLLM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from diffbox.backends.process import ServerProcess, Supervisor
from diffbox.errors import JobError
from tests.conftest import free_port

SERVE = """
import http.server, sys, time
print("booting", flush=True)
time.sleep(float(sys.argv[2]))
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _probe(port: int):  # type: ignore[no-untyped-def]
    def probe() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    return probe


def _server(tmp_path: Path, delay: float = 0.2) -> tuple[Supervisor, int]:
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    proc = ServerProcess("stand-in", [sys.executable, str(script), str(port), str(delay)], cwd=tmp_path)
    return Supervisor("stand-in", _probe(port), proc), port


def test_ready_after_start_and_restarted_after_exit(tmp_path: Path) -> None:
    supervisor, _ = _server(tmp_path)
    supervisor.start()
    try:
        supervisor.ensure_ready(20)
        assert supervisor.process is not None
        first_pid = supervisor.process.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        supervisor.process._popen.wait()  # type: ignore[union-attr]
        with pytest.raises(JobError) as err:
            supervisor.raise_if_exited("during the job")
        assert err.value.type == "backend" and err.value.details["exit_code"] == -9
        supervisor.ensure_ready(20)  # the next job gets a fresh server
        assert supervisor.process.pid != first_pid
        assert supervisor.process.returncode() is None
    finally:
        supervisor.stop()


def test_exit_during_start_reports_code_and_log_tail(tmp_path: Path) -> None:
    script = "import sys; print('loading nodes'); print('Error: CUDA unavailable', flush=True); sys.exit(7)"
    proc = ServerProcess("comfyui", [sys.executable, "-c", script])
    supervisor = Supervisor("comfyui", lambda: False, proc)
    with pytest.raises(JobError) as err:
        supervisor.ensure_ready(20)
    assert err.value.type == "backend"
    assert err.value.message == "comfyui exited with code 7 while starting"
    assert err.value.details["exit_code"] == 7
    assert err.value.details["log_tail"].splitlines()[-1] == "Error: CUDA unavailable"


def test_slow_start_past_the_bound_is_a_timeout(tmp_path: Path) -> None:
    supervisor, _ = _server(tmp_path, delay=30)
    t0 = time.monotonic()
    try:
        with pytest.raises(JobError) as err:
            supervisor.ensure_ready(1.0)
        assert err.value.type == "timeout"
        assert "did not become ready within 1 s" in err.value.message
        assert "booting" in err.value.details["log_tail"]
        assert time.monotonic() - t0 < 5
    finally:
        supervisor.stop()


def test_cancel_while_waiting_for_start(tmp_path: Path) -> None:
    supervisor, _ = _server(tmp_path, delay=30)
    try:
        with pytest.raises(JobError) as err:
            supervisor.ensure_ready(60, cancelled=lambda: True)
        assert err.value.type == "cancelled"
    finally:
        supervisor.stop()


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    # vLLM forks workers: stopping the server must not leave them holding memory or the port.
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = ServerProcess("group", [sys.executable, "-c", script])
    proc.start()
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.stop(grace_s=5)
    assert proc.returncode() is not None
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "child of the server survived stop()"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
