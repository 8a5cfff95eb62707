"""Shared fixtures: a ComfyUI to talk to, and the worker under test.

The tests that talk to ComfyUI (they ask for the `comfyui` fixture) run in two legs:
`--comfyui=fake` (the default) against the protocol-faithful fake under tests/fakes, and
`--comfyui=real` against a real ComfyUI with KJNodes that `make comfyui-env` installed into
$DIFFBOX_TEST_CACHE (tests/realcomfy.py), started once for the session on loopback with --cpu.
The real leg runs only the tests that use ComfyUI; the others ran in the fake leg already.
DIFFBOX_TEST_COMFYUI_URL points the real leg at a running ComfyUI instead (with
DIFFBOX_TEST_COMFYUI_DIR naming its folder, when it is on this disk). Tests that need the
fake's fault controls or stand-in model nodes ask for `fake_comfyui` and are skipped on a real
one; tests that need a real sampler ask for `real_comfyui`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from diffbox.config import Settings
from tests import processes
from tests.s3 import S3Server, start_moto
from tests.urlserver import NetGuard

if TYPE_CHECKING:
    from tests.chatworker import ChatWorker
    from tests.fakes.runpod_api import FakeRunpodApi

REPO = Path(__file__).resolve().parent.parent
# Every worker log the suite writes; pytest_sessionfinish checks them for secrets (loghygiene.py).
WORKER_LOGS: list[Path] = []
TEST_INPUT = json.loads((REPO / "test_input.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ComfyTarget:
    url: str
    base_dir: Path | None
    is_fake: bool


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--comfyui", choices=("fake", "real"),
                     default="real" if os.environ.get("DIFFBOX_TEST_COMFYUI_URL") else "fake",
                     help="which ComfyUI the end-to-end tests talk to (default: fake, or real when "
                          "DIFFBOX_TEST_COMFYUI_URL is set)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fake_leg_only(reason): uses ComfyUI, but runs in the fake leg only")


def real_leg(config: pytest.Config) -> bool:
    return bool(config.getoption("--comfyui") == "real")


# A real ComfyUI's start and first model load count against the first test that uses it; on a
# busy 2-core machine that alone can pass pytest-timeout's default (pyproject.toml).
REAL_LEG_TIMEOUT_S = 300


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not real_leg(config):
        return
    keep = [item for item in items if "comfyui" in getattr(item, "fixturenames", ())
            and item.get_closest_marker("fake_leg_only") is None]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    for item in keep:
        marker = item.get_closest_marker("timeout")
        if marker is None or (marker.args and marker.args[0] < REAL_LEG_TIMEOUT_S):
            item.add_marker(pytest.mark.timeout(REAL_LEG_TIMEOUT_S), append=False)


@pytest.fixture(scope="session")
def comfyui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyTarget]:
    if real_leg(request.config) and (url := os.environ.get("DIFFBOX_TEST_COMFYUI_URL")):
        base = os.environ.get("DIFFBOX_TEST_COMFYUI_DIR")
        yield ComfyTarget(url.rstrip("/"), Path(base) if base else None, is_fake=False)
        return
    if real_leg(request.config):
        from tests.realcomfy import installed, start_real_comfyui

        try:
            install = installed()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        with start_real_comfyui(install, tmp_path_factory.mktemp("real-comfyui"), free_port()) as real:
            yield ComfyTarget(real.url, real.base_dir, is_fake=False)
        return
    from tests.fakes.comfyui import start_fake_comfyui

    base_dir = tmp_path_factory.mktemp("comfyui")
    with start_fake_comfyui(base_dir) as fake:
        yield ComfyTarget(fake.url, base_dir, is_fake=True)


@pytest.fixture(scope="session")
def fake_comfyui(comfyui: ComfyTarget) -> ComfyTarget:
    if not comfyui.is_fake:
        pytest.skip("needs the fake ComfyUI's fault controls or stand-in model nodes")
    return comfyui


@pytest.fixture(scope="session")
def real_comfyui(comfyui: ComfyTarget) -> ComfyTarget:
    if comfyui.is_fake:
        pytest.skip("needs a real ComfyUI (--comfyui=real)")
    return comfyui


def worker_env(comfy: ComfyTarget, work_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_"))}
    env.update(
        DIFFBOX_COMFYUI_URL=comfy.url,
        DIFFBOX_WORK_DIR=str(work_dir),
        DIFFBOX_STARTUP_TIMEOUT_S="60",
        DIFFBOX_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    if comfy.base_dir is not None:
        env["DIFFBOX_COMFYUI_DIR"] = str(comfy.base_dir)
        env["DIFFBOX_MODELS_DIR"] = str(comfy.base_dir / "models")
    env.update(extra)
    return env


def job_error(body: dict[str, Any]) -> dict[str, Any]:
    """The error object of a FAILED RunPod job (the adapter sends it as a JSON string)."""
    assert body.get("status") == "FAILED", body
    error = json.loads(body["error"])
    assert isinstance(error, dict)
    return error


@dataclass
class RunpodApi:
    """`python handler.py --rp_serve_api`: the runpod SDK's own local API server."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    timeout_s: float = 120.0
    _stopped: bool = field(default=False)

    def runsync(self, job_input: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.url}/runsync", json={"input": job_input}, timeout=self.timeout_s)
        response.raise_for_status()
        return dict(response.json())

    def run(self, job_input: dict[str, Any]) -> str:
        response = requests.post(f"{self.url}/run", json={"input": job_input}, timeout=self.timeout_s)
        response.raise_for_status()
        return str(response.json()["id"])

    def status(self, job_id: str) -> dict[str, Any]:
        response = requests.post(f"{self.url}/status/{job_id}", timeout=self.timeout_s)
        response.raise_for_status()
        return dict(response.json())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if not self._stopped:
            processes.stop(self.proc)
            self._stopped = True


def start_runpod_api(env: dict[str, str], log_path: Path, *args: str) -> RunpodApi:
    port = free_port()
    WORKER_LOGS.append(log_path)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port), *args],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"handler exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            requests.get(f"{url}/docs", timeout=1)
            return RunpodApi(url, proc, log_path)
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"handler API did not start:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def rp_api(comfyui: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    tmp = tmp_path_factory.mktemp("worker")
    api = start_runpod_api(worker_env(comfyui, tmp / "work"), tmp / "handler.log")
    yield api
    api.stop()


@pytest.fixture(scope="module")
def runpod_api() -> Iterator[FakeRunpodApi]:
    """RunPod's job API on loopback (tests/fakes/runpod_api.py), for production-loop workers."""
    from tests.fakes.runpod_api import FakeRunpodApi

    api = FakeRunpodApi().start()
    yield api
    api.close()


@contextmanager
def production_worker(env: dict[str, str], log_path: Path,
                      preexec_fn: Callable[[], None] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`python handler.py` as RunPod runs it, in the runpod SDK's production loop (the job API's
    variables in `env`); its log joins the session's log check. `preexec_fn` runs in the child
    before it starts (bench/cold_start.py puts it in a throttled cgroup)."""
    WORKER_LOGS.append(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        yield proc
    finally:
        processes.stop(proc)


@pytest.fixture
def own_comfyui(comfyui: ComfyTarget, tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    """Settings for a worker that starts its own ComfyUI of this leg's kind, and the folder its
    input, output and temp folders are in."""
    port, work = free_port(), tmp_path / "work"
    if comfyui.is_fake:
        from tests.fakes.comfyui import write_comfyui_dir

        base = tmp_path / "ComfyUI"
        write_comfyui_dir(base)
        (base / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"")
        yield Settings(comfyui_dir=base, comfyui_port=port, work_dir=work, startup_timeout_s=60,
                       comfyui_args=["--cpu"]), base
        return
    from tests.realcomfy import installed, prepare_folders, server_args

    install, base = installed(), tmp_path / "real"
    prepare_folders(base, install)
    yield Settings(comfyui_dir=install.comfy_dir, comfyui_python=str(install.python), comfyui_port=port,
                   comfyui_args=server_args(base), models_dir=base / "models", work_dir=work,
                   startup_timeout_s=240), base


def comfy_folder_files(base: Path) -> set[Path]:
    """The files in a ComfyUI's input, output and temp folders."""
    return {p for folder in ("input", "output", "temp") for p in (base / folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on loopback, in its own process, for the whole session."""
    with start_moto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="session")
def chat_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatWorker]:
    """The chat worker (tests/chatworker.py): one real vLLM for the whole session."""
    from tests.chatworker import NOT_PREPARED, prepared, start_chat_worker

    if not prepared():
        pytest.skip(NOT_PREPARED)
    with start_chat_worker(tmp_path_factory.mktemp("chat")) as worker:
        yield worker


@pytest.fixture
def net_guard(monkeypatch: pytest.MonkeyPatch) -> NetGuard:
    """Every connection urllib3 makes in this process goes through a NetGuard: loopback only,
    made-up public addresses routed to loopback servers, each attempt recorded."""
    import urllib3.util.connection

    guard = NetGuard(urllib3.util.connection.create_connection)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", guard.connect)
    return guard


@pytest.fixture(scope="session", autouse=True)
def in_process_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every `diffbox` log record of this process (in-process Service tests), at DEBUG, as the
    worker writes them, into a file the end-of-session check reads with the handlers' logs."""
    from diffbox.logs import JsonFormatter

    path = tmp_path_factory.mktemp("logs") / "in-process.jsonl"
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("diffbox")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    WORKER_LOGS.append(path)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(level)
    handler.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when any worker log of it holds a credential, a presigned URL's signature or
    image bytes. A hook rather than a last test: it sees the logs of every test that ran (module
    fixtures' workers stop only at their module's end), whatever the order or selection."""
    from tests.loghygiene import scan

    findings = scan(WORKER_LOGS)
    if findings:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["worker logs hold secrets or image bytes:", *findings[:50]]
        if reporter is not None:
            reporter.write_sep("=", "log hygiene", red=True)
            for line in lines:
                reporter.write_line(line)
        else:
            print("\n".join(lines), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
