"""ComfyUI killed mid-job (SIGKILL: an out-of-memory kill, a crash), on both legs: the worker
supervises a ComfyUI of its own (the real one from tests/comfyui_env on the real leg, the fake's
main.py on the fake leg). The job fails naming the exit, the next job gets a fresh ComfyUI and a
correct result, and nothing is left in ComfyUI's folders or the worker's, nor a process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from diffbox.config import Settings
from diffbox.service import Service
from tests.conftest import ComfyTarget, free_port
from tests.fakes.comfyui import write_comfyui_dir
from tests.jobkit import Baseline, invert_job, is_inversion_of, png_b64, sampler_graph, wait_until

IMAGE = png_b64((250, 120, 3))


@pytest.fixture
def own_comfyui(comfyui: ComfyTarget, tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    """Settings for a worker that starts its own ComfyUI of this leg's kind, and the folder its
    input, output and temp folders are in."""
    port, work = free_port(), tmp_path / "work"
    if comfyui.is_fake:
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


def folder_files(base: Path) -> set[Path]:
    return {p for folder in ("input", "output", "temp") for p in (base / folder).rglob("*") if p.is_file()}


async def test_comfyui_killed_mid_sampling_fails_the_job_and_the_next_one_gets_a_fresh_comfyui(
    own_comfyui: tuple[Settings, Path]
) -> None:
    settings, base = own_comfyui
    before = Baseline.take()
    service = Service(settings)
    supervisor = service.comfy.supervisor  # type: ignore[union-attr]
    service.start()
    try:
        warm = await service.run("warm", invert_job(IMAGE))
        assert is_inversion_of(warm["images"][0]["data"], IMAGE), warm
        pid = supervisor.process.pid  # type: ignore[union-attr]
        killed = threading.Event()

        def on_progress(update: dict[str, Any]) -> None:
            if update.get("step") and not killed.is_set():
                killed.set()
                os.kill(pid, signal.SIGKILL)

        result = await service.run("killed", {"workflow": sampler_graph(200)}, on_progress)
        assert killed.is_set()
        error = result["error"]
        assert error["type"] == "backend", result
        assert error["message"] == "comfyui exited with code -9 during the job"
        assert error["details"]["exit_code"] == -9
        nxt = await service.run("next", invert_job(IMAGE))
        assert "error" not in nxt and is_inversion_of(nxt["images"][0]["data"], IMAGE), nxt
        assert supervisor.process.pid != pid  # type: ignore[union-attr]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # Its folders were empty before the first job: every job's files are gone again.
        wait_until(lambda: folder_files(base) == set(), 10, f"the jobs' files removed: {folder_files(base)}")
        assert not any((settings.work_dir / job).exists() for job in ("killed", "next"))
    finally:
        service.stop()
    wait_until(lambda: not before.new_children(), 20, f"child processes ended: {before.new_children()}")
    wait_until(lambda: not before.leaked_threads(), 10, f"threads ended: {before.leaked_threads()}")
