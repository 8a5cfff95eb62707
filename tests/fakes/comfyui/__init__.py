"""A protocol-faithful fake of ComfyUI 0.3.64 for tests (never product code).

It answers HTTP and WebSocket as the recordings of a real ComfyUI do (routes, validation errors,
message order, history), runs image/video nodes with Pillow and PyAV and stands in for model
nodes without weights. Faults and knobs: see faults.py.

    start_fake_comfyui(base_dir, *extra_args) -> FakeComfyUIProcess   # a subprocess on a free port
    write_comfyui_dir(path)                                            # a ComfyUI-like folder with main.py
    python -m tests.fakes.comfyui --listen 127.0.0.1 --port 8188 [--cpu] [--base-directory DIR]

This module imports nothing heavy: the server runs in its own process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests import processes

REPO_ROOT = Path(__file__).resolve().parents[3]
GUI_LINE = re.compile(r"To see the GUI go to: (http://\S+)")
MODEL_SUBFOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "hypernetworks",
    "photomaker", "classifiers", "model_patches", "audio_encoders",
)

_MAIN_PY = '''"""ComfyUI's main.py, standing in: starts the test fake (tests.fakes.comfyui) on this folder."""

import os
import sys

sys.path.insert(0, {repo!r})

from tests.fakes.comfyui.server import main  # noqa: E402

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(main(["--base-directory", here, *sys.argv[1:]]))
'''


def write_comfyui_dir(path: Path) -> None:
    """Make `path` look like a ComfyUI checkout: `cd path && python main.py --listen 127.0.0.1 --port P`
    starts the fake with this folder as its base directory (input/, output/, temp/, models/)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "main.py").write_text(_MAIN_PY.format(repo=str(REPO_ROOT)))
    for name in ("input", "output", "temp"):
        (path / name).mkdir(exist_ok=True)
    for name in MODEL_SUBFOLDERS:
        (path / "models" / name).mkdir(parents=True, exist_ok=True)


class FakeComfyUIProcess:
    """A running fake: `.url`, `.base_dir`, `.pid`, `.stop()`, `.output()` (its stdout+stderr so far)."""

    def __init__(self, proc: subprocess.Popen[str], base_dir: Path) -> None:
        self.proc = proc
        self.base_dir = base_dir
        self.url = ""
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="fake-comfyui-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            match = GUI_LINE.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if not self._ready.wait(timeout_s) or not self.url:
            self.stop()
            raise RuntimeError(f"fake ComfyUI did not start (exit code {self.proc.poll()}):\n{self.output()[-3000:]}")
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake ComfyUI never answered /system_stats:\n{self.output()[-3000:]}")

    def stop(self, timeout_s: float = 5.0) -> None:
        processes.stop(self.proc, timeout_s)
        self._reader.join(timeout_s)

    def __enter__(self) -> FakeComfyUIProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_fake_comfyui(base_dir: Path, *extra_args: str, timeout_s: float = 30.0) -> FakeComfyUIProcess:
    """Start `python -m tests.fakes.comfyui --port 0 --base-directory base_dir` and wait for it to
    print its URL and answer GET /system_stats with 200."""
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.comfyui", "--listen", "127.0.0.1", "--port", "0",
         "--base-directory", str(base_dir), *extra_args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    fake = FakeComfyUIProcess(proc, base_dir)
    fake.wait_ready(timeout_s)
    return fake


__all__ = ["REPO_ROOT", "FakeComfyUIProcess", "start_fake_comfyui", "write_comfyui_dir"]
