"""ComfyUI as this worker runs it: a supervised subprocess or an attached URL, and where
its input and output folders are on this disk (for clean-up and reading outputs directly)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import requests

from .. import logs
from ..config import Settings
from ..model_paths import CONFIG_NAME, write_extra_model_paths
from . import comfyui_preload
from .comfyui import ComfyClient, FileRef
from .comfyui_job import IdleSockets
from .process import ServerProcess, Supervisor

log = logs.get("comfyui")


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class ComfyServer:
    def __init__(self, settings: Settings) -> None:
        process = None
        if settings.comfyui_url:
            url = settings.comfyui_url
        elif settings.comfyui_dir:
            url = f"http://127.0.0.1:{settings.comfyui_port}"
            argv = [settings.comfyui_python, "main.py", "--listen", "127.0.0.1",
                    "--port", str(settings.comfyui_port), "--disable-auto-launch", *settings.comfyui_args]
            if settings.models_dir.is_dir():
                # Weights live outside the install (baked /models or a network volume).
                config = write_extra_model_paths(settings.models_dir, settings.work_dir / CONFIG_NAME)
                argv += ["--extra-model-paths-config", str(config)]
            process = ServerProcess("comfyui", argv, cwd=settings.comfyui_dir)
        else:
            raise ValueError("set DIFFBOX_COMFYUI_DIR (a ComfyUI install to start) or DIFFBOX_COMFYUI_URL")
        self.client = ComfyClient(url)
        self.sockets = IdleSockets()
        # Probed often while it starts: a refused connection on loopback costs next to nothing,
        # and an early job goes out as soon as it answers.
        self.supervisor = Supervisor("comfyui", self.client.probe, process, probe_every_s=0.02)
        self.input_dir, self.output_dir, self.temp_dir = self._folders(settings)
        # Prompts of ended jobs that ComfyUI may still run: prompt id -> the job's folder, and
        # what to let go once the prompt has left ComfyUI (its LoRAs' cache pins).
        self._orphans: dict[str, tuple[str, Callable[[], None] | None]] = {}
        self._lock = threading.Lock()

    def preload(self, timeout_s: float) -> bool:
        """Start the first half of ComfyUI (comfyui_preload.py), with no GPU, where this worker
        starts it; False where it does not, or the preload failed (then `start` starts it whole)."""
        process = self.supervisor.process
        return process is not None and process.hold(Path(comfyui_preload.__file__), comfyui_preload.READY,
                                                    timeout_s)

    def release(self) -> None:
        """Let a preloaded ComfyUI finish starting, in this container's environment."""
        if self.supervisor.process is not None:
            self.supervisor.process.release()

    @staticmethod
    def _folders(settings: Settings) -> tuple[Path | None, Path | None, Path | None]:
        """ComfyUI's folders, when they are on this disk (a started server, or DIFFBOX_COMFYUI_DIR
        given beside DIFFBOX_COMFYUI_URL for a sidecar sharing the disk)."""
        if settings.comfyui_dir is None:
            return None, None, None
        args = settings.comfyui_args
        base = Path(_flag_value(args, "--base-directory") or settings.comfyui_dir)

        def folder(name: str) -> Path:
            return Path(_flag_value(args, f"--{name}-directory") or base / name)

        return folder("input"), folder("output"), folder("temp")

    def local_path(self, ref: FileRef) -> Path | None:
        root = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}.get(ref.type)
        if root is None:
            return None
        path = (root / ref.subfolder / ref.filename).resolve()
        # ComfyUI names the file; still never read outside its folder.
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            return None
        return path

    def remove_job_files(self, subfolder: str) -> None:
        """A job's outputs, where ComfyUI's output folder is on this disk."""
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir / subfolder, ignore_errors=True)

    def disown(self, prompt_id: str, subfolder: str, on_gone: Callable[[], None] | None = None) -> None:
        """Hand over a prompt whose job ended before ComfyUI said the prompt had (it hung or
        dropped us): it may still be queued, or run and write into the job's folder, and read
        the files `on_gone` lets go (called once the prompt has left ComfyUI)."""
        with self._lock:
            self._orphans[prompt_id] = (subfolder, on_gone)

    def reap(self) -> None:
        """Stop disowned prompts, and once they have ended remove their files and history, so
        that no job waits behind them and a warm worker's disk does not fill up. Called when
        ComfyUI answers again; whatever cannot be done now is tried by the next job."""
        with self._lock:
            orphans = dict(self._orphans)
        for _ in range(2):  # stop, then look again: a dequeued prompt is gone at once
            if not orphans:
                return
            try:
                running, pending = self.client.queue()
                for prompt_id, (subfolder, on_gone) in list(orphans.items()):
                    if prompt_id in pending:
                        self.client.delete_queued(prompt_id)
                    elif prompt_id in running:
                        self.client.interrupt(prompt_id)
                    else:
                        if on_gone is not None:
                            on_gone()
                        self.remove_job_files(subfolder)
                        self.client.forget(prompt_id)
                        del orphans[prompt_id]
                        with self._lock:
                            self._orphans.pop(prompt_id, None)
                        logs.event(log, "orphaned prompt cleaned up", prompt_id=prompt_id)
            except (requests.RequestException, ValueError) as exc:
                logs.event(log, "could not clean up orphaned prompts yet", level=30, error=type(exc).__name__)
                return
