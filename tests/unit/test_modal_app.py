"""`modal_app.py` without a Modal account: what is defined, with which GPU, volumes and
secrets, and how the web API reads Modal's call states (on stand-ins for Modal's objects)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import modal
import modal.exception
import pytest
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]
from fastapi.testclient import TestClient

import modal_app
from diffbox.api.http_api import JobStatus, create_app
from tests.conftest import REPO
from tests.fakes.modal_stubs import FakeCall, FakeCalls, FakeDict

# Prints what modal_app defines, as Modal's own objects describe it.
DESCRIBE = """
import dataclasses, json, warnings
warnings.simplefilter("ignore")
import modal_app as m
from modal._partial_function import _PartialFunctionFlags as F, _find_partial_methods_for_user_cls

def spec(function):
    s = function._spec_
    return {"gpu": s.gpus, "volumes": {str(k): repr(v) for k, v in s.volumes.items()},
            "secrets": [repr(x) for x in s.secrets]}

def enter(flag):
    return list(_find_partial_methods_for_user_cls(m.Worker._get_user_cls(), flag))

print(json.dumps({"app": m.app.name, "methods": sorted(m.Worker._get_method_names()),
                  "enter": {"snapshot": enter(F.ENTER_PRE_SNAPSHOT), "restore": enter(F.ENTER_POST_SNAPSHOT)},
                  "worker": spec(m.Worker._get_class_service_function()), "web": spec(m.web),
                  "download": spec(m.download_models), "config": dataclasses.asdict(m.CONFIG)}))
"""


def describe(**env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBOX_")}
    done = subprocess.run([sys.executable, "-c", DESCRIBE], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_defaults_define_the_gpu_class_web_api_and_download() -> None:
    d = describe()
    assert d["app"] == "diffbox"
    assert d["methods"] == ["run", "stream"]
    worker, config = d["worker"], d["config"]
    assert worker["gpu"] == "H100"
    # The weights Volume is mounted where the worker looks for them.
    assert worker["volumes"] == {"/models": "modal.Volume.from_name('diffbox-models')"}
    assert config["worker_env"]["DIFFBOX_MODELS_DIR"] == "/models"
    assert config["worker_env"]["DIFFBOX_COMFYUI_DIR"] == "/opt/comfy/ComfyUI"
    # No S3 or Hugging Face secret unless named; the worker's settings travel as env.
    assert [s for s in worker["secrets"] if "from_name" in s] == []
    assert d["web"]["gpu"] is None
    assert d["web"]["secrets"] == ["modal.Secret.from_name('diffbox-api')"]
    assert d["download"]["gpu"] is None
    assert d["download"]["volumes"] == worker["volumes"]
    assert config["scaledown_s"] == 300
    # Modal's bound covers the backends' start and the worker's own job timeout.
    assert config["timeout_s"] == 900 + 3600 + 300
    # Memory snapshots: one hook before the snapshot, one after each restore; GPU ones opt-in.
    assert config["snapshot"] and not config["gpu_snapshot"]
    assert d["enter"] == {"snapshot": ["prepare"], "restore": ["start"]}


def test_snapshots_can_be_turned_off() -> None:
    off = describe(DIFFBOX_MODAL_SNAPSHOT="0", DIFFBOX_MODAL_GPU_SNAPSHOT="1")
    assert not off["config"]["snapshot"] and not off["config"]["gpu_snapshot"]
    # Modal refuses a `snap=True` hook without snapshots: both run at start, in this order.
    assert off["enter"] == {"snapshot": [], "restore": ["prepare", "start"]}


def test_deploy_environment_chooses_gpu_secrets_and_worker_settings() -> None:
    d = describe(DIFFBOX_MODAL_GPU="H100, A100-80GB", DIFFBOX_MODAL_S3_SECRET="my-s3",
                 DIFFBOX_MODAL_HF_SECRET="my-hf", DIFFBOX_MODAL_API_SECRET="", DIFFBOX_MODAL_SCALEDOWN_S="60",
                 DIFFBOX_WORKFLOWS="i2v", DIFFBOX_JOB_TIMEOUT_S="600", DIFFBOX_MODAL_GPU_SNAPSHOT="1",
                 DIFFBOX_COMFYUI_URL="http://127.0.0.1:8188", DIFFBOX_API_KEY="local-secret")
    worker, config = d["worker"], d["config"]
    assert worker["gpu"] == ["H100", "A100-80GB"]
    named = [s for s in worker["secrets"] if "from_name" in s]
    assert named == ["modal.Secret.from_name('my-s3')", "modal.Secret.from_name('my-hf')"]
    assert d["download"]["secrets"] == ["modal.Secret.from_name('my-hf')"]
    assert d["web"]["secrets"] == []
    assert config["scaledown_s"] == 60 and config["timeout_s"] == 900 + 600 + 300
    assert config["snapshot"] and config["gpu_snapshot"]
    assert d["enter"] == {"snapshot": ["prepare"], "restore": ["start"]}
    env = config["worker_env"]
    assert env["DIFFBOX_WORKFLOWS"] == "i2v" and env["DIFFBOX_JOB_TIMEOUT_S"] == "600"
    # The deploying machine's own servers, paths and secrets stay there.
    assert "DIFFBOX_COMFYUI_URL" not in env and "DIFFBOX_API_KEY" not in env
    assert not any(k.startswith("DIFFBOX_MODAL_") for k in env)


def test_image_is_built_like_dockerfile_serverless() -> None:
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / "Dockerfile.serverless").read_bytes()))
    assert parser.baseimage == modal_app.CUDA_IMAGE
    assert parser.args["PYTHON_VERSION"] == modal_app.PYTHON_VERSION
    assert parser.args["TORCH_INDEX"] == modal_app.TORCH_INDEX
    assert parser.args["TORCH_PACKAGES"] == modal_app.TORCH_PACKAGES
    assert parser.args["VLLM_VERSION"] == modal_app.VLLM_VERSION
    steps = [(i["instruction"], i["value"]) for i in parser.structure]
    # uv comes from a stage of its own, named by an ARG before the first FROM.
    assert ("ARG", f"UV_IMAGE=ghcr.io/astral-sh/uv:{modal_app.UV_VERSION}") in steps
    assert ("COPY", "--from=uv /uv /uvx /usr/local/bin/") in steps
    apt = next(v for k, v in steps if k == "RUN" and "apt-get install" in v)
    assert set(modal_app.APT_PACKAGES) <= set(apt.split())
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert f"-m builder comfyui --dest {modal_app.COMFYUI_HOME} " in runs
    env = " ".join(v for k, v in steps if k == "ENV")
    assert f"DIFFBOX_COMFYUI_DIR={modal_app.CONFIG.worker_env['DIFFBOX_COMFYUI_DIR']}" in env
    assert f"DIFFBOX_COMFYUI_PYTHON={modal_app.CONFIG.worker_env['DIFFBOX_COMFYUI_PYTHON']}" in env
    # The builder's files, copied before the ComfyUI step in both.
    copied: set[str] = set()
    for kind, value in steps:
        if kind == "COPY" and "--from" not in value:
            *sources, dest = value.split()
            copied |= {src.rstrip("/") if src.endswith("/") else f"{dest.rstrip('/')}/{Path(src).name}"
                       for src in sources}
    assert set(modal_app.BUILDER_FILES) <= copied and "builder" in copied


def test_builder_runs_from_the_files_built_into_the_image(tmp_path: Path) -> None:
    """The ComfyUI layer's context is only builder/, modal_app.BUILDER_FILES and the pins."""
    for name in (*modal_app.BUILDER_FILES, "workflows/comfyui.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "builder", tmp_path / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "diffbox" / "workflows" / "__init__.py").touch()
    done = subprocess.run([sys.executable, "-m", "builder", "comfyui", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--torch-index" in done.stdout


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> FakeCalls:
    known = FakeCalls()
    monkeypatch.setattr(modal.FunctionCall, "from_id", known.from_id)
    return known


async def test_modal_jobs_map_call_states_to_runpod_statuses(calls: FakeCalls) -> None:
    progress = FakeDict()
    jobs = modal_app.ModalJobs(cast(modal.Dict, progress))

    async def status(outcome: Any) -> JobStatus | None:
        return await jobs.status(calls.add(FakeCall(outcome)).object_id)

    assert await status({"workflow": "i2v", "outputs": []}) == JobStatus(
        "COMPLETED", output={"workflow": "i2v", "outputs": []})
    assert await status({"error": {"type": "validation", "message": "prompt: required"}}) == JobStatus(
        "FAILED", error='{"type": "validation", "message": "prompt: required"}')
    assert await status(TimeoutError()) == JobStatus("IN_QUEUE")
    running = calls.add(FakeCall(TimeoutError()))
    progress.put(running.object_id, {"seq": 4, "stage": "running", "percent": 30.0})
    assert await jobs.status(running.object_id) == JobStatus("IN_PROGRESS", output=progress.get(running.object_id))
    assert await status(modal.exception.OutputExpiredError()) is None
    assert await jobs.status("fc-unknown") is None
    timed_out = await status(modal.exception.FunctionTimeoutError("timed out"))
    assert timed_out is not None and timed_out.status == "TIMED_OUT"
    assert json.loads(timed_out.error)["type"] == "timeout"
    crashed = calls.add(FakeCall(modal.exception.RemoteError("container exited")))
    failed = await jobs.status(crashed.object_id)
    assert failed is not None and failed.status == "FAILED"
    assert "container exited" in json.loads(failed.error)["message"]

    # Modal reports a cancelled call as failed; the mark /cancel leaves tells them apart.
    assert await jobs.cancel(crashed.object_id) == JobStatus("CANCELLED")
    assert crashed.cancelled
    assert await jobs.status(crashed.object_id) == JobStatus("CANCELLED")
    assert await jobs.cancel("fc-unknown") is None


def test_web_api_spawns_worker_calls(calls: FakeCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[Any] = []

    async def spawn(payload: Any) -> FakeCall:
        spawned.append(payload)
        return calls.add(FakeCall({"images": []}, call_id="fc-1"))

    worker = SimpleNamespace(run=SimpleNamespace(spawn=SimpleNamespace(aio=spawn)))
    monkeypatch.setattr(modal_app, "Worker", lambda: worker)
    app = create_app(modal_app.ModalJobs(cast(modal.Dict, FakeDict())), max_wait_s=modal_app.WEB_MAX_WAIT_S)
    with TestClient(app) as api:
        body = api.post("/runsync", json={"input": {"workflow": {}}}).json()
        assert body == {"id": "fc-1", "status": "COMPLETED", "output": {"images": []}}
        assert api.post("/run", json={"input": {"workflow": {}}}).json() == {"id": "fc-1", "status": "IN_QUEUE"}
        assert api.get("/status/fc-1").json()["status"] == "COMPLETED"
    assert spawned == [{"workflow": {}}, {"workflow": {}}]
