"""Faults a worker meets in production, each one injected on purpose: ComfyUI refusing
connections, hanging without an answer, answering garbage, losing its WebSocket for good;
S3 going down while outputs upload; jobs cancelled or timed out while still queued.

The faults inside ComfyUI (refusing, hanging, garbage, a fault at a given sampler step) use
the fake's controls and run on the fake leg only: a real server cannot be told to hang its HTTP
while its WebSocket stays open, or to fail at step 2. The same faults on the wire, and ComfyUI
killed, run on both legs in test_wire_faults.py and test_comfyui_killed.py; the tests here that
need no control of the fake (`any_comfy`: queued jobs stopped, S3 failing) run on both legs too.

Each test checks the job ends with the right error type, that it left no file, no prompt in
ComfyUI's queue, no thread and no child process behind, and that the next job succeeds. How
long a job took is never measured against this machine's speed: a job bounded by a timeout
must end while the fault still lasts (faults last until cleared, or far longer than the
bound), and a prompt that must be stopped is one that would otherwise run for minutes
(ENDLESS_STEPS: pytest-timeout ends the test first). The faults already covered in
test_job_lifecycle.py (ComfyUI killed mid-job, cancel and timeout while running, a dropped
WebSocket that reconnects) are not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import requests

from diffbox.backends import comfyui, comfyui_job, process
from diffbox.config import S3Settings, Settings
from diffbox.service import Service
from tests.conftest import ComfyTarget, free_port
from tests.fakes.comfyui import write_comfyui_dir
from tests.fakes.comfyui.faults import clear_faults, get_faults, set_fault
from tests.jobkit import (
    INVERT_GRAPH,
    Baseline,
    invert_job,
    is_inversion_of,
    png_b64,
    queue_ids,
    sampler_graph,
    sampling,
    sampling_fake,
    settings,
    wait_until,
)
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY

IMAGE = png_b64((200, 30, 90))
# A sampler the fake takes 500 s to run (0.05 s a step; 10000 is KSampler's own limit): a job or
# test that ends at all has stopped it, whatever this machine's speed.
ENDLESS_STEPS = 10000
# How long a "refuse" lasts: the listener is closed, so the fake cannot be told to end it early.
# Far longer than any bound it tests; the test then waits for it to end.
REFUSE_FOR_S = 10.0


@pytest.fixture
def comfy(fake_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    with sampling_fake(fake_comfyui, step_delay_s=0.05) as fake:
        yield fake
        # A refused or hung server answers again once its fault's duration is over.
        wait_until(lambda: answers(f"{fake.url}/__fake__/fault"), 15, "the fake answering")
        clear_faults(fake.url)


@pytest.fixture
def any_comfy(comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    """Either leg's ComfyUI running sampler_graph: for the tests that need none of the fake's
    fault controls."""
    with sampling(comfyui, step_delay_s=0.05) as target:
        yield target


@pytest.fixture
def short_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's HTTP timeout and the WebSocket's reconnect window, shortened so that a test of
    what they bound takes seconds (production: 30 s and 15 s)."""
    monkeypatch.setattr(comfyui, "HTTP_TIMEOUT_S", 2.0)
    monkeypatch.setattr(comfyui_job, "RECONCILE_AFTER_S", 1.0)
    monkeypatch.setattr(comfyui_job, "RECONNECT_FOR_S", 2.0)


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


def refusing(comfy: ComfyTarget) -> bool:
    try:
        requests.get(f"{comfy.url}/queue", timeout=5)
        return False
    except requests.ConnectionError:
        return True


def active(comfy: ComfyTarget) -> list[str]:
    """The fake's fault states in force now (its control routes answer through every one but refuse)."""
    return list(get_faults(comfy.url)["active"])


async def timed(coro: Any) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    result = await coro
    return result, time.monotonic() - t0


async def succeeds(service: Service, job_id: str = "next") -> None:
    result = await service.run(job_id, invert_job(IMAGE))
    assert "error" not in result, result
    [image] = result["images"]
    assert is_inversion_of(image["data"], IMAGE)


async def warm(service: Service) -> Baseline:
    """A job first, so that what a job starts once per worker (pool threads) is in the baseline."""
    await succeeds(service, "warm")
    return Baseline.take()


@pytest.mark.parametrize("kind", ["refuse", "hang"])
async def test_comfyui_refusing_or_hanging_at_start_is_a_timeout_within_the_startup_bound(
    comfy: ComfyTarget, tmp_path: Path, kind: str
) -> None:
    before = Baseline.take()
    service = Service(settings(comfy, tmp_path, startup_timeout_s=1.5))
    set_fault(comfy.url, kind, duration_s=REFUSE_FOR_S if kind == "refuse" else None)
    # "refuse" closes the listening socket just after answering; "hang" holds before it answers.
    wait_until(lambda: refusing(comfy) if kind == "refuse" else active(comfy) == ["hang"], 10, kind)
    result = await service.run("at-start", invert_job(IMAGE))
    assert result["error"]["type"] == "timeout", result
    assert "comfyui did not become ready within 1.5 s" in result["error"]["message"]
    # It gave up within its bound, not when ComfyUI came back.
    assert refusing(comfy) if kind == "refuse" else active(comfy) == ["hang"]
    if kind == "hang":
        clear_faults(comfy.url)
    wait_until(lambda: answers(f"{comfy.url}/queue"), REFUSE_FOR_S + 5, "ComfyUI answering again")
    before.assert_nothing_left(comfy, tmp_path / "work", "at-start")
    # Once it answers again, the next job waits for it within its startup bound.
    await succeeds(Service(settings(comfy, tmp_path, startup_timeout_s=10)))


async def test_comfyui_refusing_connections_on_a_warm_worker_fails_the_job_as_backend(
    comfy: ComfyTarget, tmp_path: Path
) -> None:
    service = Service(settings(comfy, tmp_path, startup_timeout_s=10))
    before = await warm(service)
    # Gone: the WebSocket the worker keeps between jobs is cut, and nothing new is accepted.
    set_fault(comfy.url, "drop_ws")
    set_fault(comfy.url, "refuse", duration_s=REFUSE_FOR_S)  # acts after drop_ws (both are queued)
    wait_until(lambda: refusing(comfy), 10, "ComfyUI refusing")
    # The worker believed ComfyUI ready; its first connection finds it gone.
    result = await service.run("refused-warm", invert_job(IMAGE))
    assert result["error"]["type"] == "backend", result
    assert result["error"]["message"].startswith("lost the connection to ComfyUI")
    assert refusing(comfy)  # failed at once, not once ComfyUI came back
    wait_until(lambda: answers(f"{comfy.url}/queue"), REFUSE_FOR_S + 5, "ComfyUI listening again")
    before.assert_nothing_left(comfy, tmp_path / "work", "refused-warm")
    await succeeds(service)  # probes again, waits for it to listen


async def test_comfyui_hanging_mid_job_is_bounded_by_http_timeouts_and_its_prompt_is_stopped_later(
    comfy: ComfyTarget, tmp_path: Path, short_http: None
) -> None:
    service = Service(settings(comfy, tmp_path, startup_timeout_s=15))
    before = await warm(service)
    # Execution stalls at step 2 and HTTP stops answering; the WebSocket stays open, silent.
    set_fault(comfy.url, "hang", node_class="KSampler", step=2)  # until cleared
    result = await service.run("hung-mid", {"workflow": sampler_graph(ENDLESS_STEPS)})
    assert result["error"]["type"] == "backend", result
    assert result["error"]["message"].startswith("lost the connection to ComfyUI")
    # Silence noticed after RECONCILE_AFTER_S, then one HTTP timeout: the job, and its clean-up,
    # ended while ComfyUI still hung (ComfyUI's side is cleaned up by the next job).
    assert active(comfy) == ["hang"]
    clear_faults(comfy.url)
    # The next job stops the orphaned prompt once ComfyUI answers again, before queuing its own
    # (behind the orphan's endless sampler it would never run).
    await succeeds(service)
    before.assert_nothing_left(comfy, tmp_path / "work", "hung-mid", "next")


async def test_comfyui_hung_for_good_is_restarted_for_the_next_job(
    fake_comfyui: ComfyTarget, tmp_path: Path, short_http: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "HUNG_AFTER_S", 2.0)
    comfy_dir = tmp_path / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    (comfy_dir / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"")
    port = free_port()
    before = Baseline.take()
    service = Service(Settings(comfyui_dir=comfy_dir, comfyui_port=port, work_dir=tmp_path / "work",
                               startup_timeout_s=60, comfyui_args=["--cpu"]))
    supervisor = service.comfy.supervisor  # type: ignore[union-attr]
    service.start()
    try:
        await succeeds(service, "warm")
        hung_pid = supervisor.process.pid  # type: ignore[union-attr]
        set_fault(f"http://127.0.0.1:{port}", "hang", node_class="KSampler", step=2)  # no end
        # The hang never ends: that the job ends at all is the bound under test.
        result = await service.run("hung-for-good", {"workflow": sampler_graph(ENDLESS_STEPS)})
        assert result["error"]["type"] == "backend", result
        # The next job finds it silent, restarts it and runs on the fresh one.
        result = await service.run("after-restart", invert_job(IMAGE))
        assert "error" not in result, result
        assert supervisor.process.pid != hung_pid  # type: ignore[union-attr]
        assert not psutil.pid_exists(hung_pid) or psutil.Process(hung_pid).status() == psutil.STATUS_ZOMBIE
        assert not list((comfy_dir / "output" / "diffbox").glob("hung-for-good-*"))
    finally:
        service.stop()
    before.wait_ended(children_s=10)


async def test_garbage_answers_fail_the_job_as_backend(comfy: ComfyTarget, tmp_path: Path) -> None:
    service = Service(settings(comfy, tmp_path))
    before = await warm(service)
    set_fault(comfy.url, "garbage_http")  # until cleared
    result = await service.run("garbage", invert_job(IMAGE))
    assert result["error"]["type"] == "backend", result
    assert "ComfyUI" in result["error"]["message"]
    assert active(comfy) == ["garbage_http"]  # failed on the garbage, did not wait it out
    clear_faults(comfy.url)
    await succeeds(service)
    before.assert_nothing_left(comfy, tmp_path / "work", "garbage", "next")


async def test_garbage_once_the_prompt_runs_leaves_the_job_done_and_the_prompt_cleaned_up(
    comfy: ComfyTarget, tmp_path: Path
) -> None:
    service = Service(settings(comfy, tmp_path))
    before = await warm(service)
    set_fault(comfy.url, "garbage_http", on="prompt")  # until cleared
    result = await service.run("garbage-mid", {"workflow": sampler_graph(4)})
    # Once its prompt runs, a job needs no HTTP answer (its messages and outputs come over the
    # WebSocket): it succeeds while the garbage lasts; the clean-up that meets it is left to the
    # next job.
    assert "error" not in result, result
    assert active(comfy) == ["garbage_http"]
    clear_faults(comfy.url)
    await succeeds(service)
    before.assert_nothing_left(comfy, tmp_path / "work", "garbage-mid", "next")
    # Its prompt is not left in ComfyUI's history either (it grows for the worker's life).
    history = requests.get(f"{comfy.url}/history", timeout=5).json()
    assert not any("garbage-mid" in str(entry.get("prompt")) for entry in history.values())


async def test_websocket_lost_for_good_fails_the_job_within_the_reconnect_window(
    comfy: ComfyTarget, tmp_path: Path, short_http: None
) -> None:
    service = Service(settings(comfy, tmp_path))
    before = await warm(service)
    # Both at step 2: the socket is cut and no new connection is accepted for a while.
    set_fault(comfy.url, "refuse", node_class="KSampler", step=2, duration_s=REFUSE_FOR_S)
    set_fault(comfy.url, "drop_ws", node_class="KSampler", step=2)
    result = await service.run("ws-lost", {"workflow": sampler_graph(ENDLESS_STEPS)})
    assert result["error"]["type"] == "backend", result
    assert refusing(comfy)  # it gave up after its reconnect window, not when ComfyUI came back
    wait_until(lambda: answers(f"{comfy.url}/queue"), REFUSE_FOR_S + 5, "ComfyUI listening again")
    await succeeds(service)  # the orphan's endless sampler stopped first
    before.assert_nothing_left(comfy, tmp_path / "work", "ws-lost", "next")


async def test_cancel_while_queued_takes_the_prompt_out_of_comfyuis_queue(
    any_comfy: ComfyTarget, tmp_path: Path
) -> None:
    comfy = any_comfy
    service = Service(settings(comfy, tmp_path))
    before = await warm(service)
    first_running = threading.Event()
    first_stop, second_stop = threading.Event(), threading.Event()

    def on_first(update: dict[str, Any]) -> None:
        if update.get("step"):
            first_running.set()

    first = asyncio.ensure_future(service.run("long", {"workflow": sampler_graph(400)}, on_first, first_stop))
    assert await asyncio.to_thread(first_running.wait, 20)
    running, _ = queue_ids(comfy.url)
    second_updates: list[dict[str, Any]] = []
    second = asyncio.ensure_future(service.run("queued", invert_job(IMAGE), second_updates.append, second_stop))
    await asyncio.to_thread(wait_until, lambda: len(queue_ids(comfy.url)[1]) == 1, 20, "second prompt pending")
    [pending] = queue_ids(comfy.url)[1]
    assert second_updates[-1]["stage"] == "queued"

    second_stop.set()
    result = await second
    assert result["error"]["type"] == "cancelled", result
    # Cancelled without waiting for the prompt ahead of it: the first one runs on, untouched.
    assert queue_ids(comfy.url) == (running, [])
    assert not first.done()

    first_stop.set()
    assert (await first)["error"]["type"] == "cancelled"
    before.assert_nothing_left(comfy, tmp_path / "work", "long", "queued")
    assert pending not in requests.get(f"{comfy.url}/history", timeout=5).json()
    await succeeds(service)


async def test_cancelling_the_task_of_a_queued_job_dequeues_it(
    any_comfy: ComfyTarget, tmp_path: Path
) -> None:
    comfy = any_comfy
    # The RunPod SDK cancels a job by cancelling its asyncio task.
    service = Service(settings(comfy, tmp_path))
    before = await warm(service)
    first_stop = threading.Event()
    first = asyncio.ensure_future(service.run("long-2", {"workflow": sampler_graph(400)}, stop=first_stop))
    await asyncio.to_thread(wait_until, lambda: len(queue_ids(comfy.url)[0]) == 1, 20, "first prompt running")
    running, _ = queue_ids(comfy.url)
    second = asyncio.ensure_future(service.run("queued-2", invert_job(IMAGE)))
    await asyncio.to_thread(wait_until, lambda: len(queue_ids(comfy.url)[1]) == 1, 20, "second prompt pending")
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert queue_ids(comfy.url) == (running, [])  # dequeued while the first still runs
    first_stop.set()
    await first
    before.assert_nothing_left(comfy, tmp_path / "work", "long-2", "queued-2")


async def test_timeout_while_queued_dequeues_the_prompt(
    any_comfy: ComfyTarget, tmp_path: Path
) -> None:
    comfy = any_comfy
    service = Service(settings(comfy, tmp_path))
    impatient = Service(settings(comfy, tmp_path, job_timeout_s=2.0))
    before = await warm(service)
    first_stop = threading.Event()
    first = asyncio.ensure_future(service.run("long-3", {"workflow": sampler_graph(400)}, stop=first_stop))
    await asyncio.to_thread(wait_until, lambda: len(queue_ids(comfy.url)[0]) == 1, 20, "first prompt running")
    running, _ = queue_ids(comfy.url)
    result, elapsed = await timed(impatient.run("times-out", invert_job(IMAGE)))
    assert result["error"]["type"] == "timeout", result
    assert elapsed >= 2  # never before its timeout
    assert queue_ids(comfy.url) == (running, [])  # dequeued while the first still runs
    first_stop.set()
    await first
    before.assert_nothing_left(comfy, tmp_path / "work", "long-3", "times-out")


# -- S3 going down while outputs upload --------------------------------------------------------


@contextlib.contextmanager
def moto_on(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """moto's S3 server on a given port (so it can come back where the worker expects it)."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/moto-api/"), 30, "moto listening")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_s3_down_during_upload_is_a_storage_error_and_the_next_job_succeeds_once_it_is_back(
    any_comfy: ComfyTarget, tmp_path: Path
) -> None:
    comfy = any_comfy
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = S3Settings(bucket="faults", endpoint_url=endpoint, region=REGION, access_key_id=ACCESS_KEY,
                    secret_access_key=SECRET_KEY, max_attempts=2, connect_timeout_s=1, read_timeout_s=3)
    service = Service(settings(comfy, tmp_path, s3=s3))
    with moto_on(port, tmp_path / "moto.log") as moto:
        assert service.s3 is not None
        service.s3.client.create_bucket(Bucket="faults")
        await succeeds_to_s3(service, "warm")
        before = Baseline.take()
        running = threading.Event()

        def on_progress(update: dict[str, Any]) -> None:
            if update.get("step"):
                running.set()

        job = asyncio.ensure_future(service.run("s3-down", {"workflow": sampler_graph(40)}, on_progress))
        assert await asyncio.to_thread(running.wait, 20)
        moto.kill()  # the store vanishes while the sampler still runs
        moto.wait(10)
        result = await job  # bounded by the store's timeouts and two attempts
    assert result["error"]["type"] == "storage", result
    assert "'faults'" in result["error"]["message"] and endpoint in result["error"]["message"]
    before.assert_nothing_left(comfy, tmp_path / "work", "s3-down")
    with moto_on(port, tmp_path / "moto.log"):
        service.s3.client.create_bucket(Bucket="faults")
        await succeeds_to_s3(service, "back")


async def test_an_output_that_cannot_be_stored_stops_the_prompt_early(
    any_comfy: ComfyTarget, tmp_path: Path
) -> None:
    comfy = any_comfy
    # Nothing listens at the store: the first output's upload fails within seconds, while the
    # sampler after it would run for minutes more. The job must not wait for it.
    endpoint = f"http://127.0.0.1:{free_port()}"
    s3 = S3Settings(bucket="faults", endpoint_url=endpoint, region=REGION, access_key_id=ACCESS_KEY,
                    secret_access_key=SECRET_KEY, max_attempts=2, connect_timeout_s=1, read_timeout_s=3)
    service = Service(settings(comfy, tmp_path, s3=s3))
    early_output = {f"i{k}": {**node, "inputs": {name: [f"i{v[0]}", v[1]] if isinstance(v, list) else v
                                                  for name, v in node["inputs"].items()}}
                    for k, node in INVERT_GRAPH.items()}
    job = {"workflow": {**early_output, **sampler_graph(ENDLESS_STEPS)},
           "images": [{"name": "input.png", "image": IMAGE}]}
    await service.run("store-gone-warm", job)  # the worker's pools start with the first job: not a leak
    before = Baseline.take()
    result = await service.run("store-gone", job)  # ended at all: the endless prompt was stopped
    assert result["error"]["type"] == "storage", result
    assert endpoint in result["error"]["message"]
    before.assert_nothing_left(comfy, tmp_path / "work", "store-gone")


async def succeeds_to_s3(service: Service, job_id: str) -> None:
    result = await service.run(job_id, invert_job(IMAGE))
    assert "error" not in result, result
    [image] = result["images"]
    assert image["type"] == "s3_url"
    data = requests.get(image["url"], timeout=10).content
    import base64

    assert is_inversion_of(base64.b64encode(data).decode(), IMAGE)
