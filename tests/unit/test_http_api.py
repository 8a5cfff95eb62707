"""RunPod's HTTP API over a job runner (`diffbox.api.http_api`), with a stand-in service."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import runpod
import uvicorn
from fastapi.testclient import TestClient

from diffbox.api.http_api import DEFAULT_WAIT_S, JobStatus, LocalJobs, create_app
from diffbox.progress import Emit
from diffbox.service import Service
from tests.conftest import free_port


class SlowService:
    """Finishes when `release` is set (or is stopped), after one progress payload."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def run(self, job_id: str, payload: Any, emit: Emit, stop: threading.Event | None = None) -> dict[str, Any]:
        assert stop is not None
        emit({"seq": 1, "stage": "running", "percent": 40.0, "elapsed_s": 1.0})
        while not (self.release.is_set() or stop.is_set()):
            await asyncio.sleep(0.01)
        if stop.is_set():
            return {"error": {"type": "cancelled", "message": "job cancelled"}}
        if payload.get("fail"):
            return {"error": {"type": "validation", "message": "prompt: required"}}
        return {"workflow": "i2v", "echo": payload}


class ChatStandIn(SlowService):
    """Streams a chat's chunks one by one, each once `release` is set again."""

    async def stream(self, job_id: str, payload: Any, emit: Emit,
                     stop: threading.Event | None = None) -> AsyncIterator[dict[str, Any]]:
        for chunk in ({"delta": "a "}, {"delta": "cat", "finish_reason": "stop"}):
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            self.release.clear()
            yield chunk


def client(service: SlowService, **options: Any) -> TestClient:
    return TestClient(create_app(LocalJobs(cast(Service, service)), **options))


def poll(api: TestClient, job_id: str, until: str, method: str = "GET") -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        body: dict[str, Any] = api.request(method, f"/status/{job_id}").json()
        if body["status"] == until or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_runsync_returns_runpods_envelope() -> None:
    service = SlowService()
    service.release.set()
    with client(service) as api:
        body = api.post("/runsync", json={"input": {"prompt": "a cat"}}).json()
        assert body["status"] == "COMPLETED" and body["output"] == {"workflow": "i2v", "echo": {"prompt": "a cat"}}
        assert set(body) == {"id", "status", "output"}
        failed = api.post("/runsync", json={"input": {"fail": True}}).json()
        # RunPod's `error` is a string: the error object as JSON text, as handler.py sends it.
        assert failed == {"id": failed["id"], "status": "FAILED",
                          "error": '{"type": "validation", "message": "prompt: required"}'}


def test_run_then_status_shows_progress_then_the_result() -> None:
    service = SlowService()
    with client(service) as api:
        queued = api.post("/run", json={"input": {"prompt": "a cat"}}).json()
        assert queued["status"] == "IN_QUEUE"
        running = poll(api, queued["id"], "IN_PROGRESS")
        assert running["status"] == "IN_PROGRESS" and running["output"]["percent"] == 40.0
        service.release.set()
        # POST works too, as on the runpod SDK's local API server.
        done = poll(api, queued["id"], "COMPLETED", method="POST")
        assert done["output"] == {"workflow": "i2v", "echo": {"prompt": "a cat"}}


def test_runsync_answers_in_progress_after_its_wait() -> None:
    with client(SlowService()) as api:
        body = api.post("/runsync?wait=200", json={"input": {"prompt": "a cat"}}).json()
        assert body["status"] == "IN_PROGRESS" and body["output"]["stage"] == "running"
        assert api.post(f"/cancel/{body['id']}").json()["status"] in ("IN_PROGRESS", "CANCELLED")
        assert poll(api, body["id"], "CANCELLED") == {"id": body["id"], "status": "CANCELLED"}


def test_runsync_wait_is_capped() -> None:
    service = SlowService()
    waits: list[float] = []

    class Recording(LocalJobs):
        async def status(self, job_id: str, wait_s: float = 0.0) -> JobStatus | None:
            waits.append(wait_s)
            return JobStatus("IN_QUEUE")

    with TestClient(create_app(Recording(cast(Service, service)), max_wait_s=140)) as api:
        api.post("/runsync", json={"input": {}})
        api.post("/runsync?wait=300000", json={"input": {}})
        api.post("/runsync?wait=5000", json={"input": {}})
    assert waits == [DEFAULT_WAIT_S, 140, 5.0]
    service.release.set()


def test_bad_envelopes_and_unknown_ids() -> None:
    with client(SlowService()) as api:
        assert api.post("/runsync", content=b"not json").status_code == 400
        missing = api.post("/runsync", json={"prompt": "a cat"})
        assert missing.status_code == 400 and "input: required" in missing.json()["error"]
        webhook = api.post("/run", json={"input": {}, "webhook": "https://example.com/hook"})
        assert webhook.status_code == 400 and "webhook" in webhook.json()["error"]
        assert api.get("/status/nope").status_code == 404
        assert api.post("/cancel/nope").status_code == 404


def test_api_key_is_required_when_set() -> None:
    service = SlowService()
    service.release.set()
    with client(service, api_key="s3cret") as api:
        assert api.post("/runsync", json={"input": {}}).status_code == 401
        assert api.post("/runsync", json={"input": {}}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert api.get("/status/x", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = api.post("/runsync", json={"input": {}}, headers={"Authorization": "Bearer s3cret"})
        assert ok.json()["status"] == "COMPLETED"
        # RunPod's docs also send the bare key.
        assert api.post("/runsync", json={"input": {}}, headers={"Authorization": "s3cret"}).status_code == 200


def test_the_runpod_sdk_switches_to_it_by_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """runpod's own client, pointed at this API: `run_sync` and its polling of /status."""
    service = SlowService()
    # A short /runsync wait, so the job outlives it and the client has to poll /status.
    app = create_app(LocalJobs(cast(Service, service)), api_key="s3cret", max_wait_s=0.2)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        monkeypatch.setattr(runpod, "endpoint_url_base", f"http://127.0.0.1:{config.port}")
        endpoint = runpod.Endpoint("any-endpoint-id", api_key="s3cret")
        threading.Timer(1.0, service.release.set).start()
        assert endpoint.run_sync({"prompt": "a cat"}, timeout=30) == {"workflow": "i2v", "echo": {"prompt": "a cat"}}
    finally:
        server.should_exit = True
        thread.join(10)


def test_stream_hands_out_a_streamed_chats_chunks_once_each() -> None:
    service = ChatStandIn()
    with client(service) as api:
        job_id = api.post("/run", json={"input": {"workflow": "chat", "prompt": "hi", "stream": True}}).json()["id"]
        assert api.post(f"/stream/{job_id}").json() == {"id": job_id, "status": "IN_QUEUE", "stream": []}
        service.release.set()
        deadline = time.monotonic() + 10
        while not (first := api.get(f"/stream/{job_id}").json())["stream"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert first["stream"] == [{"output": {"delta": "a "}}]
        service.release.set()
        done = poll(api, job_id, "COMPLETED")
        # /status has the whole list, as RunPod aggregates a generator handler's chunks.
        assert done["output"] == [{"delta": "a "}, {"delta": "cat", "finish_reason": "stop"}]
        rest = api.get(f"/stream/{job_id}").json()
        assert rest == {"id": job_id, "status": "COMPLETED",
                        "stream": [{"output": {"delta": "cat", "finish_reason": "stop"}}]}
        assert api.get(f"/any-endpoint/stream/{job_id}").json()["stream"] == []
        assert api.get("/stream/nope").status_code == 404


def test_a_runner_that_cannot_stream_has_no_stream_route() -> None:
    class NoStream:
        async def submit(self, payload: Any) -> str:
            return "x"

        async def status(self, job_id: str, wait_s: float = 0.0) -> JobStatus | None:
            return JobStatus("IN_QUEUE")

        async def cancel(self, job_id: str) -> JobStatus | None:
            return None

    with TestClient(create_app(NoStream())) as api:
        # FastAPI's own 404, which the client reads as "this endpoint cannot stream".
        assert api.get("/stream/x").json() == {"detail": "Not Found"}
