"""diffbox.client without an endpoint: scripted transports, Modal stand-ins, a tiny file server."""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modal
import modal.exception
import pytest
from PIL import Image

from diffbox.client import (
    ChecksumMismatch,
    Client,
    EndpointError,
    HttpTransport,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    ModalTransport,
    NotSupported,
    RunpodTransport,
    connect,
)
from diffbox.client.cli import chat_arguments, chat_request, run_arguments, run_request
from diffbox.client.download import save_outputs
from diffbox.client.job import Job, outcome
from diffbox.client.uploads import attach_local_files, data_uri
from tests.fakes.modal_stubs import FakeCall, FakeCalls, FakeDict


class Scripted:
    """A transport that answers /status with the envelopes it was given, one per call."""

    name = "scripted"
    max_request_bytes: int | None = 1000

    def __init__(self, *envelopes: dict[str, Any], chunks: list[dict[str, Any]] | None = None) -> None:
        self.envelopes = list(envelopes)
        self.chunks = chunks
        self.submitted: list[dict[str, Any]] = []
        self.cancelled: list[str] = []

    def submit(self, payload: dict[str, Any]) -> str:
        self.submitted.append(payload)
        return "job-1"

    def status(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self.envelopes.pop(0) if len(self.envelopes) > 1 else self.envelopes[0]

    def stream(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        if self.chunks is None:
            raise NotSupported("no /stream")
        return self.chunks.pop(0)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def running(seq: int, percent: float) -> dict[str, Any]:
    return {"id": "job-1", "status": "IN_PROGRESS",
            "output": {"seq": seq, "stage": "running", "percent": percent, "elapsed_s": 1.0}}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def entry(data: bytes, **overrides: Any) -> dict[str, Any]:
    return {"filename": "out.png", "kind": "image", "content_type": "image/png", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "data": base64.b64encode(data).decode(), **overrides}


# Job: progress, results, errors


def test_progress_keeps_only_newer_payloads_in_seq_order() -> None:
    done = {"id": "job-1", "status": "COMPLETED", "output": {"workflow": "i2v", "outputs": []}}
    transport = Scripted({"id": "job-1", "status": "IN_QUEUE"}, running(1, 10), running(1, 10), running(3, 30),
                         running(2, 20), running(5, 50), done)
    job = Job(transport, "job-1", poll_s=0)
    assert [u["seq"] for u in job.progress()] == [1, 3, 5]
    assert job.status == "COMPLETED" and job.last_progress is not None and job.last_progress["seq"] == 5
    assert job.result() == {"workflow": "i2v", "outputs": []}


def test_a_timeout_leaves_the_job_running() -> None:
    job = Job(Scripted(running(1, 10)), "job-1", poll_s=0.01)
    with pytest.raises(TimeoutError, match="still IN_PROGRESS"):
        job.result(timeout=0.05)


def test_failures_carry_the_workers_error() -> None:
    error = {"type": "validation", "message": "node 2 (EmptyImage) failed", "details": {"2": ["width"]}}
    with pytest.raises(JobFailed) as failed:
        outcome({"status": "FAILED", "error": json.dumps(error)}, "j")
    assert (failed.value.type, failed.value.message, failed.value.details, failed.value.job_id) == (
        "validation", error["message"], error["details"], "j")
    assert failed.value.to_dict() == error
    with pytest.raises(JobCancelled):
        outcome({"status": "FAILED", "error": json.dumps({"type": "cancelled", "message": "job cancelled"})})
    with pytest.raises(JobCancelled):
        outcome({"status": "CANCELLED"})
    with pytest.raises(JobFailed, match="timeout"):
        outcome({"status": "TIMED_OUT"})
    with pytest.raises(JobFailed) as platform:
        outcome({"status": "FAILED", "error": "Job ID not found"})
    assert (platform.value.type, platform.value.message) == ("endpoint", "Job ID not found")
    # Modal's `run` returns the error object itself.
    with pytest.raises(JobFailed, match="storage"):
        outcome({"status": "COMPLETED", "output": {"error": {"type": "storage", "message": "bucket gone"}}})


def test_a_chat_endpoints_chunk_lists_become_results() -> None:
    # A generator handler's /status output is the list of its chunks.
    one = {"workflow": "i2v", "seed": 1}
    assert outcome({"status": "COMPLETED", "output": [one]}) == one
    deltas = [{"delta": "Hel"}, {"delta": "lo"}, {"delta": "", "finish_reason": "length", "usage": {"x": 1}}]
    assert outcome({"status": "COMPLETED", "output": deltas}) == {
        "text": "Hello", "finish_reason": "length", "usage": {"x": 1}}
    with pytest.raises(JobFailed, match="backend: vLLM died"):
        outcome({"status": "COMPLETED", "output": [{"delta": "a"},
                                                   {"error": json.dumps({"type": "backend", "message": "vLLM died"})}]})


def test_stream_yields_chunks_and_falls_back_to_the_result() -> None:
    chunks = [{"status": "IN_PROGRESS", "stream": [{"output": {"delta": "a"}}]},
              {"status": "COMPLETED", "stream": [{"output": {"delta": "b"}}, {"output": {"delta": "", "usage": {}}}]}]
    job = Job(Scripted({"status": "FAILED", "error": "Job ID not found"}, chunks=chunks), "job-1", poll_s=0)
    assert [c["delta"] for c in job.stream()] == ["a", "b", ""]
    # The local server forgets a streamed job: the result comes from what was streamed.
    assert job.result() == {"text": "ab", "usage": {}}
    whole = {"status": "COMPLETED", "output": {"text": "ab", "finish_reason": "stop"}}
    assert list(Job(Scripted(whole), "job-1", poll_s=0).stream()) == [whole["output"]]
    # An endpoint that streams nothing for a plain handler's job: the result comes from /status.
    plain = {"status": "COMPLETED", "output": {"workflow": "i2v", "outputs": []}}
    nothing = [{"status": "IN_QUEUE", "stream": []}, {"status": "COMPLETED", "stream": []}]
    assert list(Job(Scripted(plain, chunks=nothing), "job-1", poll_s=0).stream()) == [plain["output"]]


def test_requests_are_validated_before_they_are_sent(tmp_path: Path) -> None:
    transport = Scripted({"status": "IN_QUEUE"})
    client = Client(transport)
    with pytest.raises(InvalidRequest) as refused:
        client.submit({"workflow": "i2v", "image": "https://example.com/cat.png", "prompt": "", "framez": 3})
    assert {d["field"] for d in refused.value.details} == {"prompt", "framez"}
    assert isinstance(refused.value, ValueError) and transport.submitted == []
    with pytest.raises(InvalidRequest, match=r"above the 0\.001 MB"):
        client.submit({"workflow": "chat", "prompt": "x" * 2000})
    job = client.submit({"workflow": "chat", "prompt": "hi"})
    assert job.id == "job-1" and transport.submitted == [{"workflow": "chat", "prompt": "hi"}]


def test_local_files_in_image_fields_are_attached(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes())
    attached = attach_local_files({"workflow": "qwen_edit", "images": [str(image), "https://x/y.png"],
                                   "prompt": str(image)}, data_uri)
    assert attached["images"] == [f"data:image/png;base64,{base64.b64encode(png_bytes()).decode()}", "https://x/y.png"]
    assert attached["prompt"] == str(image)  # only image fields
    raw = attach_local_files({"images": [{"name": "a.png", "image": str(image)}]}, lambda p: f"up:{p.name}")
    assert raw == {"images": [{"name": "a.png", "image": "up:cat.png"}]}
    odd = tmp_path / "cat.bin"
    odd.write_bytes(png_bytes())
    assert not data_uri(odd).startswith("data:")  # bare base64: the worker identifies it


# Downloads


def test_inline_outputs_are_decoded_and_checked(tmp_path: Path) -> None:
    data = png_bytes()
    paths = save_outputs([entry(data), entry(data), entry(data, filename="../../evil.png")], tmp_path)
    assert [p.name for p in paths] == ["out.png", "out-2.png", "evil.png"]
    assert all(p.read_bytes() == data and p.parent == tmp_path for p in paths)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        save_outputs([entry(data, filename="bad.png", sha256="0" * 64)], tmp_path)
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad.png.part").exists()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "video.mp4").write_bytes(b"\0\1" * 100_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_outputs_are_fetched_and_checked(file_server: str, tmp_path: Path) -> None:
    data = b"\0\1" * 100_000
    good = {**entry(data, filename="v.mp4"), "data": None, "url": f"{file_server}/video.mp4"}
    # The official worker's shape: the URL in `data` too.
    official = {**entry(data, filename="w.mp4"), "type": "s3_url", "data": f"{file_server}/video.mp4"}
    paths = save_outputs([good, official], tmp_path / "out")
    assert [p.read_bytes() == data for p in paths] == [True, True]
    with pytest.raises(ChecksumMismatch, match="bytes"):
        save_outputs([{**good, "bytes": 5}], tmp_path / "out2")
    with pytest.raises(Exception, match="HTTP 404 from its URL"):
        save_outputs([{**good, "url": f"{file_server}/missing.mp4"}], tmp_path / "out3")


# Transports


def test_connect_picks_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFBOX_API_KEY", raising=False)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-key")
    url = connect("https://x--diffbox-web.modal.run/")
    assert isinstance(url, HttpTransport) and url.base_url == "https://x--diffbox-web.modal.run"
    assert url.headers == {"Authorization": "Bearer rp-key"}
    runpod = connect("runpod:abc123")
    assert isinstance(runpod, RunpodTransport) and runpod.base_url == "https://api.runpod.ai/v2/abc123"
    assert runpod.headers["Authorization"] == "Bearer rp-key"
    monkeypatch.delenv("RUNPOD_API_KEY")
    monkeypatch.setattr("runpod.api_key", None)
    with pytest.raises(EndpointError, match="RUNPOD_API_KEY"):
        connect("abc123")
    with pytest.raises(ValueError, match="modal:APP/CLASS"):
        connect("modal:")


@pytest.fixture
def fake_modal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeCalls, FakeDict, list[Any]]]:
    calls, progress, spawned = FakeCalls(), FakeDict(), []

    class Worker:
        class run:  # Modal's method object
            @staticmethod
            def spawn(payload: Any) -> FakeCall:
                spawned.append(payload)
                return calls.add(FakeCall(TimeoutError()))

    class Cls:
        @staticmethod
        def from_name(app: str, name: str) -> type[Worker]:
            assert (app, name) == ("diffbox", "Worker")
            return Worker

    monkeypatch.setattr(modal, "Cls", Cls)
    monkeypatch.setattr(modal.Dict, "from_name", staticmethod(lambda name: progress))
    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(calls.from_id))
    yield calls, progress, spawned


def test_modal_transport(fake_modal: tuple[FakeCalls, FakeDict, list[Any]]) -> None:
    calls, progress, spawned = fake_modal
    transport = connect("modal:diffbox/Worker")
    assert isinstance(transport, ModalTransport)
    job = Client(transport, poll_s=0).submit({"workflow": "chat", "prompt": "hi"})
    assert spawned == [{"workflow": "chat", "prompt": "hi"}]
    assert transport.status(job.id)["status"] == "IN_QUEUE"
    progress.put(job.id, {"seq": 4, "stage": "running", "percent": 40.0, "elapsed_s": 2.0})
    assert transport.status(job.id) == {"id": job.id, "status": "IN_PROGRESS", "output": progress.get(job.id)}
    calls[job.id] = FakeCall({"text": "hello"}, job.id)
    assert job.result() == {"text": "hello"}
    failed = FakeCall({"error": {"type": "validation", "message": "prompt: required"}})
    with pytest.raises(JobFailed, match="prompt: required"):
        Job(transport, calls.add(failed).object_id).result()
    stopped = calls.add(FakeCall(modal.exception.ExecutionError("cancelled")))
    Job(transport, stopped.object_id).cancel()
    assert stopped.cancelled
    with pytest.raises(JobCancelled):
        Job(transport, stopped.object_id).result()
    assert transport.status("fc-unknown")["error"].startswith("job not found")
    with pytest.raises(NotSupported):
        transport.stream(job.id)


# The CLI's requests


def _args(arguments: Any, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    arguments(parser)
    return parser.parse_args(argv)


def test_run_arguments_make_requests(tmp_path: Path) -> None:
    assert run_request(_args(run_arguments, "i2v", "--image", "cat.png", "--prompt", "a cat", "--frames", "17",
                             "--set", "seed=3", "--set", "output.store=inline", "--set", "fps=1e1")) == {
        "workflow": "i2v", "image": "cat.png", "prompt": "a cat", "frames": 17, "seed": 3,
        "output": {"store": "inline"}, "fps": 10.0}
    assert run_request(_args(run_arguments, "svi", "--prompt", "a", "--prompt", "b", "--frames", "33")) == {
        "workflow": "svi", "prompts": ["a", "b"], "frames_per_clip": 33}
    assert run_request(_args(run_arguments, "qwen_edit", "--image", "a.png", "--image", "b.png")) == {
        "workflow": "qwen_edit", "images": ["a.png", "b.png"]}
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}))
    assert run_request(_args(run_arguments, "raw", "--input", str(graph), "--image", "dir/x.png")) == {
        "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}},
        "images": [{"name": "x.png", "image": "dir/x.png"}]}
    with pytest.raises(ValueError, match="one --image"):
        run_request(_args(run_arguments, "i2v", "--image", "a.png", "--image", "b.png"))
    with pytest.raises(ValueError, match="--input"):
        run_request(_args(run_arguments, "raw"))


def test_lora_arguments_read_from_the_right() -> None:
    args = _args(run_arguments, "i2v", "--lora", "hf://o/r/x.safetensors@v1:0.8:high",
                 "--lora", "https://civitai.com:443/api/download/models/1:-1.5", "--lora", "s3://b/k.safetensors:low",
                 "--lora", "https://h.example/a.safetensors")
    assert run_request(args)["loras"] == [
        {"source": "hf://o/r/x.safetensors@v1", "strength": 0.8, "target": "high"},
        {"source": "https://civitai.com:443/api/download/models/1", "strength": -1.5},
        {"source": "s3://b/k.safetensors", "target": "low"},
        {"source": "https://h.example/a.safetensors"}]


def test_chat_arguments_make_requests(tmp_path: Path) -> None:
    assert chat_request(_args(chat_arguments, "hi", "--max-tokens", "9"), True) == {
        "workflow": "chat", "prompt": "hi", "max_tokens": 9, "stream": True}
    assert chat_request(_args(chat_arguments, "hi", "--system", "be brief"), False)["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    history = tmp_path / "messages.json"
    history.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
    assert chat_request(_args(chat_arguments, "c", "--messages", str(history)), True)["messages"] == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
