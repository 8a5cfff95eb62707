"""vLLM as the worker starts it: the command built from the settings, and readiness proven by
a real completion (a small script stands in for vLLM's server; tests/unit/test_process.py
covers the supervisor every backend shares)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffbox.backends.vllm import VllmServer, argv, env
from diffbox.config import Settings
from diffbox.errors import JobError
from diffbox.service import Service
from tests.conftest import free_port

# Answers /v1/models at once, as vLLM's /health does before its engine has served anything;
# what a completion does depends on the model name: "dies" exits like a model vLLM cannot
# run, "slow" answers 503 for its first second.
STAND_IN = """
import json, os, sys, time, http.server
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
model, started = args["--model"], time.monotonic()
print("stand-in argv", sys.argv[1:], "VLLM_HOST_IP", os.environ.get("VLLM_HOST_IP"), flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": model}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print("completion", self.path, request, flush=True)
        if model == "dies":
            print("RuntimeError: head size 16 is not supported", flush=True)
            os._exit(3)
        if model == "slow" and time.monotonic() - started < 1.0:
            return self.answer(503, {"error": {"message": "not yet"}})
        self.answer(200, {"choices": [{"text": "x"}]})

http.server.HTTPServer(("127.0.0.1", int(args["--port"])), Handler).serve_forever()
"""


def _settings(tmp_path: Path, model: str) -> Settings:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return Settings(backends=["vllm"], vllm_command=[sys.executable, str(script)], vllm_model=model,
                    vllm_port=free_port())


@pytest.fixture
def started(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VllmServer]:
    server = VllmServer(_settings(tmp_path, request.param))
    server.supervisor.start()
    yield server
    server.supervisor.stop()


def test_command_from_settings() -> None:
    settings = Settings.from_env({
        "DIFFBOX_BACKENDS": "vllm",
        "DIFFBOX_VLLM_COMMAND": "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server",
        "DIFFBOX_VLLM_MODEL": "org/model", "DIFFBOX_VLLM_REVISION": "abc123", "DIFFBOX_VLLM_PORT": "8011",
        "DIFFBOX_VLLM_GPU_MEMORY_UTILIZATION": "0.35", "DIFFBOX_VLLM_MAX_MODEL_LEN": "8192",
        "DIFFBOX_VLLM_ARGS": "--enforce-eager --max-model-len 4096"})
    assert argv(settings) == [
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/model",
        "--host", "127.0.0.1", "--port", "8011", "--gpu-memory-utilization", "0.35", "--revision", "abc123",
        # DIFFBOX_VLLM_ARGS come last, so their flags win over the same flags built from settings.
        "--max-model-len", "8192", "--enforce-eager", "--max-model-len", "4096"]
    assert "--revision" not in argv(Settings(vllm_model="/models/llm/m"))


def test_environment_binds_vllm_to_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)
    assert env()["VLLM_HOST_IP"] == "127.0.0.1"
    monkeypatch.setenv("VLLM_HOST_IP", "10.0.0.5")
    assert "VLLM_HOST_IP" not in env()


def test_a_model_or_a_url_is_required() -> None:
    with pytest.raises(ValueError, match="DIFFBOX_VLLM_MODEL"):
        VllmServer(Settings(backends=["vllm"]))
    attached = VllmServer(Settings(backends=["vllm"], vllm_url="http://127.0.0.1:9/"))
    assert attached.url == "http://127.0.0.1:9" and attached.supervisor.process is None


@pytest.mark.parametrize("started", ["slow"], indirect=True)
def test_ready_only_once_a_real_completion_succeeds(started: VllmServer) -> None:
    t0 = time.monotonic()
    started.supervisor.ensure_ready(20)
    assert time.monotonic() - t0 >= 0.9  # /v1/models answered long before
    assert started.model == "slow"  # requests name the model vLLM serves
    assert started.supervisor.process is not None
    tail = started.supervisor.process.tail()
    assert "'max_tokens': 1" in tail and "'model': 'slow'" in tail
    assert "VLLM_HOST_IP 127.0.0.1" in tail and "'--port'" in tail


@pytest.mark.parametrize("started", ["dies"], indirect=True)
def test_a_model_that_dies_on_its_first_request_fails_readiness_with_its_log(started: VllmServer) -> None:
    with pytest.raises(JobError) as caught:
        started.supervisor.ensure_ready(20)
    assert caught.value.type == "backend"
    assert caught.value.message == "vllm exited with code 3 while starting"
    assert "head size 16 is not supported" in caught.value.details["log_tail"]


def test_cold_start_launches_vllm_beside_comfyui_without_waiting(tmp_path: Path) -> None:
    comfy_dir = tmp_path / "ComfyUI"
    comfy_dir.mkdir()
    (comfy_dir / "main.py").write_text("import time\ntime.sleep(60)\n")  # a ComfyUI that never answers
    settings = _settings(tmp_path, "slow").model_copy(update={
        "backends": ["comfyui", "vllm"], "comfyui_dir": comfy_dir, "comfyui_python": sys.executable,
        "comfyui_port": free_port(), "models_dir": tmp_path / "no-models", "work_dir": tmp_path / "work"})
    service = Service(settings)
    t0 = time.monotonic()
    service.start()
    try:
        assert time.monotonic() - t0 < 1
        assert service.comfy is not None and service.vllm is not None
        processes = [service.comfy.supervisor.process, service.vllm.supervisor.process]
        assert all(p is not None and p.started() and p.returncode() is None for p in processes)
        service.vllm.supervisor.ensure_ready(20)  # vLLM is ready while ComfyUI still is not
    finally:
        service.stop()
