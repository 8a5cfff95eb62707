"""Faults on the wire between the worker and ComfyUI, on both legs: a TCP proxy
(tests/faultproxy.py) resets, stalls or garbles the connections while a sampler runs, so a real
ComfyUI meets the faults test_faults.py can only ask of the fake.

Each test checks the job completes correctly (its output decoded) or ends with a clear error,
that the next job runs and is correct, and that nothing is left: no prompt in ComfyUI's queue or
history, no file in its folders or the worker's, no thread, no child process, no socket beyond
the ones a warm worker keeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from diffbox.backends import comfyui_job
from diffbox.backends.comfyui_job import IdleSockets
from diffbox.service import Service
from tests.conftest import ComfyTarget
from tests.faultproxy import FaultProxy
from tests.jobkit import (
    Baseline,
    decoded,
    invert_job,
    is_inversion_of,
    png_b64,
    sampler_graph,
    sampling,
    settings,
    wait_until,
)

IMAGE = png_b64((10, 120, 230))
STEPS = 40  # seconds of sampling on either leg: time to act while it runs
HTTP_POOL = requests.adapters.DEFAULT_POOLSIZE


@pytest.fixture
def proxied(comfyui: ComfyTarget) -> Iterator[tuple[ComfyTarget, FaultProxy]]:
    """ComfyUI as the worker sees it through the proxy (its folders are on this disk either way)."""
    address = urlsplit(comfyui.url)
    with sampling(comfyui, step_delay_s=0.05) as comfy, \
            FaultProxy((address.hostname or "127.0.0.1", address.port or 80)) as proxy:
        yield ComfyTarget(proxy.url, comfy.base_dir, comfy.is_fake), proxy


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The silence before the worker asks /history, shortened so a stalled socket costs seconds
    (production: 5 s)."""
    monkeypatch.setattr(comfyui_job, "RECONCILE_AFTER_S", 1.0)


def history_ids(comfy: ComfyTarget) -> set[str]:
    return set(requests.get(f"{comfy.url}/history", timeout=10).json())


def folder_files(comfy: ComfyTarget) -> set[Path]:
    assert comfy.base_dir is not None
    return {p for folder in ("input", "output", "temp") for p in (comfy.base_dir / folder).rglob("*") if p.is_file()}


class Watch:
    """What a warm worker has before a fault, to compare with after the next job."""

    def __init__(self, comfy: ComfyTarget, proxy: FaultProxy) -> None:
        self.comfy, self.proxy = comfy, proxy
        self.baseline = Baseline.take()
        self.history = history_ids(comfy)
        self.files = folder_files(comfy)

    def assert_nothing_left(self, tmp_path: Path, *job_ids: str) -> None:
        self.baseline.assert_nothing_left(self.comfy, tmp_path / "work", *job_ids)
        assert history_ids(self.comfy) <= self.history
        assert folder_files(self.comfy) == self.files
        # A warm worker keeps a few WebSockets (IdleSockets) and its HTTP pool's connections
        # (requests' default: up to 10 a host), whatever became of the ones before a fault.
        assert self.proxy.open_links(websocket=True) <= IdleSockets().keep
        assert self.proxy.open_links(websocket=False) <= HTTP_POOL


async def correct_invert(service: Service, job_id: str) -> None:
    result = await service.run(job_id, invert_job(IMAGE))
    assert "error" not in result, result
    assert is_inversion_of(result["images"][0]["data"], IMAGE)


async def warm(service: Service, comfy: ComfyTarget, proxy: FaultProxy) -> Watch:
    await correct_invert(service, "warm")
    # ComfyUI's side of a job that succeeded is cleaned up just after its result.
    await asyncio.to_thread(wait_until, lambda: not any(t.name.startswith("diffbox-cleanup")
                                                        for t in threading.enumerate()), 10, "clean-up done")
    return Watch(comfy, proxy)


async def sample_with(service: Service, job_id: str, fault: Any) -> dict[str, Any]:
    """A sampler job; `fault()` runs once its first step is reported."""
    fired = threading.Event()

    def on_progress(update: dict[str, Any]) -> None:
        if update.get("step") and not fired.is_set():
            fired.set()
            fault()

    result = await service.run(job_id, {"workflow": sampler_graph(STEPS)}, on_progress)
    assert fired.is_set(), "the fault never fired"
    return result


def assert_sampled(result: dict[str, Any]) -> None:
    assert "error" not in result, result
    [image] = result["images"]
    assert image["filename"].startswith("sampled_") and decoded(image["data"]).size == (64, 64)


async def completes_despite(proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path, job_id: str,
                            fault: Any, undo: Any = lambda: None) -> None:
    """A sampler job meets `fault` at its first step and still completes correctly (`undo` ends
    the fault after it); the next job is correct, and nothing is left."""
    comfy, proxy = proxied
    service = Service(settings(comfy, tmp_path))
    watch = await warm(service, comfy, proxy)
    try:
        assert_sampled(await sample_with(service, job_id, fault))
    finally:
        undo()
    await correct_invert(service, "next")
    watch.assert_nothing_left(tmp_path, job_id, "next")


async def test_a_websocket_reset_mid_sampling_reconnects_and_the_job_completes(
    proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path
) -> None:
    resets: list[int] = []
    await completes_despite(proxied, tmp_path, "ws-reset", lambda: resets.append(proxied[1].reset_websockets()))
    assert resets == [1]


async def test_every_connection_reset_mid_sampling_and_the_job_completes(
    proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path
) -> None:
    await completes_despite(proxied, tmp_path, "all-reset", proxied[1].reset_all)


async def test_a_stalled_websocket_is_reconciled_from_history(
    proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path, short_waits: None
) -> None:
    # Silent from the first step on: the job learns of its end from /history.
    proxy = proxied[1]
    await completes_despite(proxied, tmp_path, "stalled", lambda: proxy.stall_websockets(True),
                            lambda: proxy.stall_websockets(False))


async def test_garbage_after_the_prompt_is_queued_leaves_the_job_done_and_cleaned_up(
    proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path
) -> None:
    # Its messages and outputs come over the WebSocket: no HTTP answer is needed to finish; the
    # clean-up that meets the garbage is left to the next job.
    proxy = proxied[1]
    await completes_despite(proxied, tmp_path, "garbled", lambda: proxy.garbage(True), lambda: proxy.garbage(False))


async def test_refused_for_good_mid_sampling_fails_the_job_and_the_next_one_runs_once_it_is_back(
    proxied: tuple[ComfyTarget, FaultProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comfy, proxy = proxied
    monkeypatch.setattr(comfyui_job, "RECONNECT_FOR_S", 2.0)
    service = Service(settings(comfy, tmp_path))
    watch = await warm(service, comfy, proxy)

    def gone() -> None:
        proxy.refuse(True)
        proxy.reset_all()

    result = await sample_with(service, "gone", gone)
    assert result["error"]["type"] == "backend", result
    assert result["error"]["message"].startswith("lost the connection to ComfyUI")
    proxy.refuse(False)
    await correct_invert(service, "next")  # stops and forgets the orphaned prompt first
    watch.assert_nothing_left(tmp_path, "gone", "next")
