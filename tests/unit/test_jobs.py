"""Jobs driven from synchronous code (`diffbox.api.jobs`), on a stand-in service."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any, cast

import pytest
from modal.exception import InputCancellation

from diffbox.api.jobs import MemoryProgressStore, ProgressPublisher, run_job, stream_job
from diffbox.progress import Emit
from diffbox.service import Service


class FakeService:
    """`Service.run`'s signature: emits a few progress payloads, then returns or waits for `stop`."""

    def __init__(self, block: bool = False) -> None:
        self.block = block
        self.started = threading.Event()
        self.stopped = threading.Event()

    async def run(self, job_id: str, payload: Any, emit: Emit, stop: threading.Event | None = None) -> dict[str, Any]:
        assert stop is not None
        for seq in (1, 2, 3):
            emit({"seq": seq, "stage": "running", "percent": seq * 10.0, "elapsed_s": 0.0})
        self.started.set()
        if self.block:
            while not stop.is_set():
                time.sleep(0.01)
            self.stopped.set()
            return {"error": {"type": "cancelled", "message": "job cancelled"}}
        if payload == "bad":
            return {"error": {"type": "validation", "message": "input: bad"}}
        return {"job_id": job_id, "echo": payload}

    async def stream(self, job_id: str, payload: Any, emit: Emit,
                     stop: threading.Event | None = None) -> AsyncIterator[dict[str, Any]]:
        if payload == "chat":
            for word in ("a", "b"):
                yield {"delta": word}
        else:
            yield await self.run(job_id, payload, emit, stop)


def service(fake: FakeService) -> Service:
    return cast(Service, fake)


def test_run_job_returns_the_services_result_and_publishes_progress() -> None:
    published: list[dict[str, Any]] = []
    result = run_job(service(FakeService()), "job-1", {"x": 1}, published.append)
    assert result == {"job_id": "job-1", "echo": {"x": 1}}
    assert [p["seq"] for p in published] == [1, 2, 3]
    assert run_job(service(FakeService()), "job-2", "bad")["error"]["type"] == "validation"


def test_stream_job_yields_progress_then_the_result() -> None:
    events = list(stream_job(service(FakeService()), "job-1", {"x": 1}))
    assert [e["progress"]["seq"] for e in events[:-1]] == [1, 2, 3]
    assert events[-1] == {"job_id": "job-1", "echo": {"x": 1}}


def test_stream_job_yields_the_chunks_of_service_stream() -> None:
    assert list(stream_job(service(FakeService()), "job-1", "chat")) == [{"delta": "a"}, {"delta": "b"}]


def test_closing_the_stream_stops_the_job() -> None:
    fake = FakeService(block=True)
    events = stream_job(service(fake), "job-1", {})
    assert "progress" in next(events)
    assert fake.started.wait(5)
    events.close()
    assert fake.stopped.is_set()


def test_cancelling_the_waiting_thread_stops_the_job() -> None:
    """Modal cancels a sync input with SIGUSR1, whose handler raises InputCancellation in the
    main thread, where `run_job` waits."""

    def cancel(signum: int, frame: FrameType | None) -> None:
        raise InputCancellation("Input was cancelled by user")

    fake = FakeService(block=True)

    def cancel_once_started() -> None:
        fake.started.wait(5)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, cancel)
    try:
        threading.Thread(target=cancel_once_started, daemon=True).start()
        with pytest.raises(InputCancellation):
            run_job(service(fake), "job-1", {})
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert fake.stopped.is_set()


def test_publisher_writes_the_latest_payload_and_survives_store_failures() -> None:
    store = MemoryProgressStore()
    with ProgressPublisher(store, "job-1") as publish:
        for seq in range(1, 50):
            publish({"seq": seq})
    assert store.get("job-1") == {"seq": 49}

    class Broken:
        def put(self, key: str, value: dict[str, Any]) -> None:
            raise ConnectionError("store unreachable")

        def get(self, key: str, default: None = None) -> None:
            return None

    with ProgressPublisher(Broken(), "job-2") as publish:
        publish({"seq": 1})
