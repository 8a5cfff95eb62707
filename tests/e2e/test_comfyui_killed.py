"""ComfyUI killed mid-job (SIGKILL: an out-of-memory kill, a crash), on both legs: the worker
supervises a ComfyUI of its own (the real one from tests/comfyui_env on the real leg, the fake's
main.py on the fake leg). The job fails naming the exit, the next job gets a fresh ComfyUI and a
correct result, and nothing is left in ComfyUI's folders or the worker's, nor a process.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from diffbox.config import Settings
from diffbox.service import Service
from tests.conftest import comfy_folder_files
from tests.jobkit import Baseline, invert_job, is_inversion_of, png_b64, sampler_graph, wait_until

IMAGE = png_b64((250, 120, 3))


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
        wait_until(lambda: comfy_folder_files(base) == set(), 10,
                   f"the jobs' files removed: {comfy_folder_files(base)}")
        assert not any((settings.work_dir / job).exists() for job in ("killed", "next"))
    finally:
        service.stop()
    before.wait_ended()
