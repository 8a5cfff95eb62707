"""modal_app.py's calls, run in this process against ComfyUI, give what the RunPod handler gives.

No Modal account: `Worker` methods run with `.local()` (which runs both `@modal.enter` phases
first: the one before a memory snapshot, then the one after the restore), and the web API runs
on FastAPI's test client, with stand-ins for Modal's Dict and function calls
(tests/fakes/modal_stubs.py). The RunPod side is the runpod SDK's own local API server running
handler.py, against the same ComfyUI.

To look at the worker between its two start phases, the hooks are found and called the way
Modal's container entrypoint does (`modal._partial_function._find_callables_for_obj` with the
pre- and post-snapshot flags); one test does so in a child process that audits everything the
snapshot phase does (`sys.addaudithook`: sockets, processes, native libraries).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import modal
import psutil
import pytest
from fastapi.testclient import TestClient
from modal._partial_function import _find_callables_for_obj
from modal._partial_function import _PartialFunctionFlags as F
from PIL import Image

import modal_app
from diffbox import runtime
from diffbox.api.http_api import LocalJobs, create_app
from diffbox.api.jobs import run_job
from diffbox.backends import comfyui_preload
from tests.conftest import REPO, TEST_INPUT, ComfyTarget, RunpodApi, free_port, job_error, worker_env
from tests.fakes.comfyui import write_comfyui_dir
from tests.fakes.modal_stubs import FakeCall, FakeCalls, FakeDict
from tests.s3 import S3Server

pytestmark = pytest.mark.filterwarnings("ignore:The Worker.* function is executing locally")

BAD_INPUTS: list[dict[str, Any]] = [
    {**TEST_INPUT["input"], "imagez": []},
    {"workflow": TEST_INPUT["input"]["workflow"], "images": [{"name": "input.png", "image": "not base64!"}]},
    {"workflow": "no_such_workflow"},
    {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 8, "batch_size": 1,
                                                                "color": 0}},
                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}},
]


def as_container(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process's environment as a Modal container's: the worker's DIFFBOX_ settings only."""
    for name in list(os.environ):
        if name.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("DIFFBOX_"):
            monkeypatch.setenv(name, value)


@pytest.fixture
def progress(comfyui: ComfyTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDict]:
    """The worker's environment as a Modal container would have it, and a Dict for progress."""
    as_container(monkeypatch, worker_env(comfyui, tmp_path / "work"))
    runtime.service.cache_clear()
    store = FakeDict()
    monkeypatch.setattr(modal_app, "progress", store)
    yield store
    if runtime.service.cache_info().currsize:
        runtime.service().stop()
    runtime.service.cache_clear()


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """A result without what differs from job to job: timings, and the bytes of files whose
    metadata carries the job's own output path (compared decoded instead)."""
    entries = [{k: v for k, v in e.items() if k not in ("data", "bytes", "sha256")} for e in result.get("images", [])]
    return {**{k: v for k, v in result.items() if k != "timings"}, "images": entries}


def png_pixels(result: dict[str, Any]) -> bytes:
    png = next(i for i in result["images"] if i["filename"].endswith(".png"))
    return Image.open(io.BytesIO(base64.b64decode(png["data"]))).convert("RGB").tobytes()


def assert_same_result(ours: dict[str, Any], runpod: dict[str, Any]) -> None:
    assert comparable(ours) == comparable(runpod)
    assert png_pixels(ours) == png_pixels(runpod)


def test_run_returns_what_the_runpod_handler_returns(rp_api: RunpodApi, progress: FakeDict) -> None:
    expected = rp_api.runsync(TEST_INPUT["input"])
    assert expected["status"] == "COMPLETED", expected
    result = modal_app.Worker().run.local(TEST_INPUT["input"])
    assert "error" not in result, result
    assert_same_result(result, expected["output"])
    # Progress went to the Dict under the call's id, ending with the upload stage.
    [(job_id, last)] = progress.data.items()
    assert job_id.startswith("local-") and last["stage"] == "uploading"


def test_errors_are_those_of_the_runpod_handler(rp_api: RunpodApi, progress: FakeDict) -> None:
    worker = modal_app.Worker()
    for job_input in BAD_INPUTS:
        # The same error object; RunPod's envelope carries it as JSON text.
        assert worker.run.local(job_input) == {"error": job_error(rp_api.runsync(job_input))}


def test_stream_yields_progress_then_the_result(rp_api: RunpodApi, progress: FakeDict) -> None:
    events = list(modal_app.Worker().stream.local(TEST_INPUT["input"]))
    updates = [e["progress"] for e in events[:-1]]
    assert updates and all(set(e) == {"progress"} for e in events[:-1])
    assert [u["seq"] for u in updates] == sorted({u["seq"] for u in updates})
    assert [u["percent"] for u in updates] == sorted(u["percent"] for u in updates)
    assert updates[0]["stage"] == "inputs" and updates[-1]["stage"] == "uploading"
    assert_same_result(events[-1], rp_api.runsync(TEST_INPUT["input"])["output"])


def test_web_api_answers_like_runpods(rp_api: RunpodApi, progress: FakeDict,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployed web app (create_app over ModalJobs), with `Worker.run` spawned as a
    `.local()` call on a thread instead of a Modal container."""
    calls = FakeCalls()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    call_ids = threading.local()
    worker = modal_app.Worker

    def run_as(call_id: str, payload: Any) -> dict[str, Any]:
        call_ids.value = call_id
        return worker().run.local(payload)

    async def spawn(payload: Any) -> FakeCall:
        call_id = f"fc-{len(calls)}"
        return calls.add(FakeCall(call_id=call_id, future=pool.submit(run_as, call_id, payload)))

    spawner = type("Spawner", (), {"run": type("Run", (), {"spawn": type("Spawn", (), {"aio": staticmethod(spawn)})})})
    monkeypatch.setattr(modal_app, "Worker", spawner)
    monkeypatch.setattr(modal, "current_function_call_id", lambda: getattr(call_ids, "value", None))
    monkeypatch.setattr(modal.FunctionCall, "from_id", calls.from_id)
    app = create_app(modal_app.ModalJobs(cast(modal.Dict, progress)), max_wait_s=modal_app.WEB_MAX_WAIT_S)
    try:
        with TestClient(app) as api:
            body = api.post("/runsync", json=TEST_INPUT).json()
            expected = rp_api.runsync(TEST_INPUT["input"])
            assert set(body) == set(expected) == {"id", "status", "output"}
            assert body["status"] == "COMPLETED"
            assert_same_result(body["output"], expected["output"])
            assert progress.data[body["id"]]["stage"] == "uploading"

            failed = api.post("/runsync", json={"input": BAD_INPUTS[0]}).json()
            expected = rp_api.runsync(BAD_INPUTS[0])
            assert {**failed, "id": None} == {**expected, "id": None}

            job_id = api.post("/run", json=TEST_INPUT).json()["id"]
            assert api.get(f"/status/{job_id}").json()["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
            calls[job_id].get(60)
            done = api.get(f"/status/{job_id}").json()
            assert done["status"] == "COMPLETED" and comparable(done["output"]) == comparable(body["output"])
    finally:
        pool.shutdown()


def test_in_process_web_api_answers_like_runpods(rp_api: RunpodApi, progress: FakeDict) -> None:
    """The same app over LocalJobs: jobs on this process's Service, no platform at all."""
    with TestClient(create_app(LocalJobs(runtime.service()))) as api:
        body = api.post("/runsync", json=TEST_INPUT).json()
    expected = rp_api.runsync(TEST_INPUT["input"])
    assert body["status"] == expected["status"] == "COMPLETED"
    assert_same_result(body["output"], expected["output"])


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


class Phases(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(getattr(record, "fields", {}).get("phase", ""))


def test_local_runs_the_snapshot_phase_then_the_restore_phase_then_the_job(progress: FakeDict) -> None:
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


def test_restore_reseeds_random(progress: FakeDict) -> None:
    instance = runtime.prepare()
    try:
        random.seed(0)
        frozen = random.random()
        random.seed(0)  # the state every container restored from one snapshot would start with
        runtime.start(instance)
        assert random.random() != frozen
    finally:
        instance.stop()


def test_gpu_snapshot_phase_closes_its_connections_to_comfyui(comfyui: ComfyTarget, progress: FakeDict) -> None:
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


@pytest.fixture
def comfyui_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Modal container's environment where the worker starts ComfyUI itself: here the fake's
    main.py, in a folder laid out like ComfyUI's (returned)."""
    comfy_dir = tmp_path / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    as_container(monkeypatch, {"DIFFBOX_COMFYUI_DIR": str(comfy_dir), "DIFFBOX_COMFYUI_PORT": str(free_port()),
                               "DIFFBOX_MODELS_DIR": str(comfy_dir / "models"),
                               "DIFFBOX_WORK_DIR": str(tmp_path / "work"), "DIFFBOX_COMFYUI_ARGS": "--cpu",
                               "DIFFBOX_STARTUP_TIMEOUT_S": "60"})
    monkeypatch.setattr(modal_app, "progress", FakeDict())
    return comfy_dir


def enter(worker: Any, phase: int) -> None:
    for hook in _find_callables_for_obj(worker, phase).values():
        hook()


def test_cpu_snapshot_phase_holds_comfyui_half_started_without_a_gpu(comfyui_to_start: Path) -> None:
    """The snapshot phase leaves ComfyUI's process waiting with no GPU visible and not yet
    serving; the restore phase lets that same process finish, and a job runs on it."""
    worker = modal_app.Worker._get_user_cls()()
    enter(worker, F.ENTER_PRE_SNAPSHOT)
    try:
        process = worker.service.comfy.supervisor.process
        held = psutil.Process(process.pid)
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{held.pid}/environ").read_text().split("\0") if e)
        assert environ["CUDA_VISIBLE_DEVICES"] == ""
        assert comfyui_preload.READY in process.tail()
        assert held.net_connections("inet") == []  # not listening yet: ComfyUI's server is the second half
        enter(worker, F.ENTER_POST_SNAPSHOT)
        result = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"](TEST_INPUT["input"])
        assert "error" not in result, result
        assert result["images"]
        assert process.pid == held.pid and held.is_running()  # the held process finished its start
    finally:
        worker.service.stop()


def test_a_failed_preload_leaves_comfyui_to_start_whole_after_the_restore(comfyui_to_start: Path) -> None:
    # ComfyUI's own prologue failing in the first half (this one cannot import `comfy`).
    (comfyui_to_start / "cuda_malloc.py").write_text("")
    worker = modal_app.Worker._get_user_cls()()
    enter(worker, F.ENTER_PRE_SNAPSHOT)
    try:
        assert not worker.service.comfy.supervisor.process.started()
        enter(worker, F.ENTER_POST_SNAPSHOT)
        result = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"](TEST_INPUT["input"])
        assert "error" not in result, result
        assert comfyui_preload.READY not in worker.service.comfy.supervisor.process.tail()
    finally:
        worker.service.stop()


# -- the CPU snapshot's preload on this leg's ComfyUI: the real one's main.py on the real leg --

SECRET = "container-secret-0123456789"


@pytest.fixture
def comfyui_of_this_leg(comfyui: ComfyTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Modal container where the worker starts ComfyUI itself (DIFFBOX_COMFYUI_DIR, as Modal
    deploys it): the fake's main.py, or on the real leg the real ComfyUI's own (its cuda_malloc.py
    prologue and torch included, its folders here). A credential is in the environment, as a
    Modal secret puts it there."""
    env = {"DIFFBOX_COMFYUI_PORT": str(free_port()), "DIFFBOX_WORK_DIR": str(tmp_path / "work"),
           "DIFFBOX_STARTUP_TIMEOUT_S": "240"}
    if comfyui.is_fake:
        comfy_dir = tmp_path / "ComfyUI"
        write_comfyui_dir(comfy_dir)
        env.update(DIFFBOX_COMFYUI_DIR=str(comfy_dir), DIFFBOX_MODELS_DIR=str(comfy_dir / "models"),
                   DIFFBOX_COMFYUI_ARGS="--cpu")
    else:
        from tests.realcomfy import installed, prepare_folders, server_args

        install, base = installed(), tmp_path / "real"
        prepare_folders(base, install)
        env.update(DIFFBOX_COMFYUI_DIR=str(install.comfy_dir), DIFFBOX_COMFYUI_PYTHON=str(install.python),
                   DIFFBOX_MODELS_DIR=str(base / "models"), DIFFBOX_COMFYUI_ARGS=shlex.join(server_args(base)))
    as_container(monkeypatch, env)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setattr(modal_app, "progress", FakeDict())


def held_environ(pid: int) -> dict[str, str]:
    return dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)


def test_cpu_snapshot_phase_preloads_this_legs_comfyui_holding_no_socket_or_credential(
        comfyui: ComfyTarget, comfyui_of_this_leg: None) -> None:
    worker = modal_app.Worker._get_user_cls()()
    enter(worker, F.ENTER_PRE_SNAPSHOT)
    try:
        process = worker.service.comfy.supervisor.process
        held = psutil.Process(process.pid)
        assert comfyui_preload.READY in process.tail(), process.tail()
        environ = held_environ(held.pid)
        assert environ["CUDA_VISIBLE_DEVICES"] == ""
        # The snapshot holds this process's memory: no credential may be in it (the container's
        # environment reaches it after the restore).
        assert SECRET not in "\0".join(environ.values())
        assert held.net_connections("inet") == [] and held.children() == []
        if not comfyui.is_fake:
            # The real first half: ComfyUI's prologue ran and torch is loaded, with no GPU.
            maps = Path(f"/proc/{held.pid}/maps").read_text()
            assert "libtorch_cpu" in maps
        enter(worker, F.ENTER_POST_SNAPSHOT)
        result = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"](TEST_INPUT["input"])
        assert "error" not in result, result
        assert result["images"] and all(i["data"] for i in result["images"])
        assert process.pid == held.pid and held.is_running()  # the held process finished its start
    finally:
        worker.service.stop()


def test_a_cuda_query_during_the_real_preload_is_caught_and_comfyui_starts_whole_after_the_restore(
        real_comfyui: ComfyTarget, comfyui_of_this_leg: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package of the preload's list (torchaudio: not installed in the test's ComfyUI, so the
    # stand-in shadows nothing) that asks CUDA for its devices when imported, as some do.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torchaudio.py").write_text("import torch\n\ntorch.cuda.is_available()\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    worker = modal_app.Worker._get_user_cls()()
    enter(worker, F.ENTER_PRE_SNAPSHOT)
    try:
        process = worker.service.comfy.supervisor.process
        assert not process.started()
        assert "diffbox-preload: CUDA queried while the GPU is hidden, by torchaudio" in process.tail()
        enter(worker, F.ENTER_POST_SNAPSHOT)
        result = _find_callables_for_obj(worker, F.CALLABLE_INTERFACE)["run"](TEST_INPUT["input"])
        assert "error" not in result, result
        assert comfyui_preload.READY not in process.tail()
    finally:
        worker.service.stop()
