"""modal_app.py's calls, run in this process against ComfyUI, give what the RunPod handler gives.

No Modal account: `Worker` methods run with `.local()` (which runs `@modal.enter()` first),
and the web API runs on FastAPI's test client, with stand-ins for Modal's Dict and function
calls (tests/fakes/modal_stubs.py). The RunPod side is the runpod SDK's own local API server
running handler.py, against the same ComfyUI.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import modal
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import modal_app
from diffbox import runtime
from diffbox.http_api import LocalJobs, create_app
from tests.conftest import TEST_INPUT, ComfyTarget, RunpodApi, job_error, worker_env
from tests.fakes.modal_stubs import FakeCall, FakeCalls, FakeDict

pytestmark = pytest.mark.filterwarnings("ignore:The Worker.* function is executing locally")

BAD_INPUTS: list[dict[str, Any]] = [
    {**TEST_INPUT["input"], "imagez": []},
    {"workflow": TEST_INPUT["input"]["workflow"], "images": [{"name": "input.png", "image": "not base64!"}]},
    {"workflow": "no_such_workflow"},
    {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 8, "batch_size": 1,
                                                                "color": 0}},
                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}},
]


@pytest.fixture
def progress(comfyui: ComfyTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDict]:
    """The worker's environment as a Modal container would have it, and a Dict for progress."""
    for name in list(os.environ):
        if name.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_")):
            monkeypatch.delenv(name)
    for name, value in worker_env(comfyui, tmp_path / "work").items():
        if name.startswith("DIFFBOX_"):
            monkeypatch.setenv(name, value)
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
