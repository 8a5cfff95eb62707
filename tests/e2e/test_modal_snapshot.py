"""The Worker's two start phases around a Modal memory snapshot, run as Modal runs them.

`.local()` runs both `@modal.enter` phases (snapshot, then restore) before the call, in this
process. To look at the worker between the phases, the hooks are found and called the way
Modal's container entrypoint does (`modal._partial_function._find_callables_for_obj` with the
pre- and post-snapshot flags), in a child process that audits everything the snapshot phase
does (`sys.addaudithook`: sockets, processes, native libraries) and then runs a job.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from modal._partial_function import _find_callables_for_obj
from modal._partial_function import _PartialFunctionFlags as F

import modal_app
from diffbox import runtime
from diffbox.backends import comfyui_preload
from diffbox.jobs import run_job
from tests.conftest import REPO, TEST_INPUT, ComfyTarget, free_port, worker_env
from tests.fakes.comfyui import write_comfyui_dir
from tests.fakes.modal_stubs import FakeDict
from tests.s3 import S3Server

pytestmark = pytest.mark.filterwarnings("ignore:The Worker.* function is executing locally")

# The phases of one container, in a fresh interpreter: what the snapshot phase did (audited),
# the worker's state at its end and after the restore phase, then one job's result.
PHASES = r"""
import json, os, random, sys, warnings
warnings.simplefilter("ignore")
import psutil
import modal_app
from modal._partial_function import _PartialFunctionFlags as F, _find_callables_for_obj
from tests.fakes.modal_stubs import FakeDict

modal_app.progress = FakeDict()
worker = modal_app.Worker._get_user_cls()()
me = psutil.Process()
audited = []

def audit(event, args):
    if event in ("socket.connect", "socket.bind", "subprocess.Popen", "os.fork", "os.posix_spawn",
                 "os.exec", "ctypes.dlopen"):
        audited.append([event, repr(args)[:300], os.environ.get("CUDA_VISIBLE_DEVICES")])

sys.addaudithook(audit)
for hook in _find_callables_for_obj(worker, F.ENTER_PRE_SNAPSHOT).values():
    hook()
service = worker.service
snapshot = {
    "hooks": list(_find_callables_for_obj(worker, F.ENTER_PRE_SNAPSHOT)),
    "audited": audited[:],
    "gpu_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm", "pynvml")),
    "children": [p.pid for p in me.children(recursive=True)],
    "connections": [str(c) for c in me.net_connections("inet")],
    "storage_settings": service.settings.s3 is not None,
    "storage_client": service.s3 is not None,
    "secret_in_settings": os.environ["AWS_SECRET_ACCESS_KEY"] in repr(service.settings.model_dump()),
}
random.seed(0)  # as if the snapshot had frozen this generator's state
for hook in _find_callables_for_obj(worker, F.ENTER_POST_SNAPSHOT).values():
    hook()
random.seed(0)
replayed = random.random()
restored = {
    "hooks": list(_find_callables_for_obj(worker, F.ENTER_POST_SNAPSHOT)),
    "storage_client": worker.service.s3 is not None,
}
run = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"]
result = run(json.loads(sys.argv[1]))
print(json.dumps({"snapshot": snapshot, "restored": restored, "result": result}))
"""


@pytest.fixture
def container_env(comfyui: ComfyTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's environment as a Modal container would have it, and a Dict for progress."""
    for name in list(os.environ):
        if name.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_")):
            monkeypatch.delenv(name)
    for name, value in worker_env(comfyui, tmp_path / "work").items():
        if name.startswith("DIFFBOX_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(modal_app, "progress", FakeDict())
    yield


class Phases(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(getattr(record, "fields", {}).get("phase", ""))


def test_local_runs_the_snapshot_phase_then_the_restore_phase_then_the_job(container_env: None) -> None:
    phases = Phases()
    logger = logging.getLogger("diffbox.runtime")
    logger.addHandler(phases)
    try:
        result = modal_app.Worker().run.local(TEST_INPUT["input"])
    finally:
        logger.removeHandler(phases)
    assert phases.seen == ["prepare", "start"]
    assert "error" not in result, result
    assert [i["filename"] for i in result["images"]] and all(i["data"] for i in result["images"])


def test_snapshot_phase_holds_no_gpu_socket_process_or_credential(
        comfyui: ComfyTarget, s3_server: S3Server, tmp_path: Path) -> None:
    env = {**worker_env(comfyui, tmp_path / "work"), **s3_server.env(s3_server.new_bucket()),
           "DIFFBOX_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", PHASES, json.dumps(TEST_INPUT["input"])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    snapshot, restored = report["snapshot"], report["restored"]
    assert snapshot["hooks"] == ["prepare"] and restored["hooks"] == ["start"]
    # Nothing that could reach a GPU, a server or a process: no native library loaded, no
    # socket, no child; torch and vLLM are not even imported.
    assert snapshot["audited"] == []
    assert snapshot["gpu_modules"] == []
    assert snapshot["children"] == [] and snapshot["connections"] == []
    # Storage credentials and the client made from them come with the restore, not before.
    assert not snapshot["storage_settings"] and not snapshot["storage_client"]
    assert not snapshot["secret_in_settings"]
    assert restored["storage_client"]
    # The job after both phases ran end to end and stored its outputs through that client.
    result = report["result"]
    assert "error" not in result, result
    assert result["images"] and all(i["type"] == "s3_url" for i in result["images"])


def test_restore_reseeds_random(container_env: None) -> None:
    instance = runtime.prepare()
    try:
        random.seed(0)
        frozen = random.random()
        random.seed(0)  # the state every container restored from one snapshot would start with
        runtime.start(instance)
        assert random.random() != frozen
    finally:
        instance.stop()


def test_gpu_snapshot_phase_closes_its_connections_to_comfyui(comfyui: ComfyTarget, container_env: None) -> None:
    """With GPU snapshots ComfyUI is started and probed before the snapshot: the connection
    the probe used must be closed by then (a snapshot cannot keep it), and a new one opened
    after the restore."""
    port = int(comfyui.url.rsplit(":", 1)[1].split("/")[0])

    def to_comfyui() -> set[int]:
        """Local ports of this process's open connections to ComfyUI."""
        return {c.laddr.port for c in psutil.Process().net_connections("tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}

    before = to_comfyui()  # other tests' clients in this process
    instance = runtime.prepare("gpu")
    try:
        assert to_comfyui() - before == set()
        # Not vacuous: a request leaves its connection in the client's pool until dropped.
        assert instance.comfy is not None and instance.comfy.client.probe()
        assert to_comfyui() - before
        instance.drop_connections()
        assert to_comfyui() - before == set()
        runtime.start(instance, "gpu")
        result = run_job(instance, "job-1", TEST_INPUT["input"], lambda _: None)
        assert "error" not in result, result
        assert result["images"]
    finally:
        instance.stop()


def test_cpu_snapshot_phase_holds_comfyui_half_started_without_a_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the worker starts ComfyUI (here the fake's main.py, in a folder laid out like
    ComfyUI's), the snapshot phase leaves its process waiting with no GPU visible and not yet
    serving; the restore phase lets that same process finish, and a job runs on it."""
    comfy_dir = tmp_path / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    port = free_port()
    for name in list(os.environ):
        if name.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_")):
            monkeypatch.delenv(name)
    for name, value in {"DIFFBOX_COMFYUI_DIR": str(comfy_dir), "DIFFBOX_COMFYUI_PORT": str(port),
                        "DIFFBOX_MODELS_DIR": str(comfy_dir / "models"), "DIFFBOX_WORK_DIR": str(tmp_path / "work"),
                        "DIFFBOX_COMFYUI_ARGS": "--cpu", "DIFFBOX_STARTUP_TIMEOUT_S": "60"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(modal_app, "progress", FakeDict())
    worker = modal_app.Worker._get_user_cls()()
    for hook in _find_callables_for_obj(worker, F.ENTER_PRE_SNAPSHOT).values():
        hook()
    try:
        process = worker.service.comfy.supervisor.process
        held = psutil.Process(process.pid)
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{held.pid}/environ").read_text().split("\0") if e)
        assert environ["CUDA_VISIBLE_DEVICES"] == ""
        assert comfyui_preload.READY in process.tail()
        assert held.net_connections("inet") == []  # not listening yet: ComfyUI's server is the second half
        for hook in _find_callables_for_obj(worker, F.ENTER_POST_SNAPSHOT).values():
            hook()
        result = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"](TEST_INPUT["input"])
        assert "error" not in result, result
        assert result["images"]
        assert process.pid == held.pid and held.is_running()  # the held process finished its start
    finally:
        worker.service.stop()
