"""A real ComfyUI (with KJNodes) on the CPU for the tests' real leg.

`make comfyui-env` (tests/comfyui_env/setup.sh) installs it once into $DIFFBOX_TEST_CACHE/comfyui
with `python -m builder comfyui` and makes tiny random-weight models beside it; this module
finds that install and starts servers from it, each on a free loopback port with folders of
its own (input, output, temp, user, models).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from diffbox.model_paths import COMFY_FOLDERS, CONFIG_NAME, write_extra_model_paths
from tests import processes

CACHE = Path(os.environ.get("DIFFBOX_TEST_CACHE") or Path.home() / ".cache" / "diffbox-test")
TINY_CHECKPOINT = "tiny.safetensors"
NOT_PREPARED = (
    "the real ComfyUI for the tests is not installed in {cache}: run `make comfyui-env` (it installs the pinned "
    "ComfyUI and custom nodes from GitHub, or from local archives named in DIFFBOX_COMFYUI_SOURCE, e.g. "
    "DIFFBOX_COMFYUI_SOURCE=../shared/comfyui/src as .ci/run sets it), or point DIFFBOX_TEST_COMFYUI_URL at a "
    "running one"
)
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Install:
    comfy_dir: Path
    python: Path
    models: Path  # the tiny models (checkpoints/, vae_approx/)
    typed_models: Path  # stand-ins for the typed workflows' weights (make_typed_models.py)


def installed(cache: Path = CACHE) -> Install:
    """The cached install, or a failure that says how to make one."""
    install = Install(cache / "comfyui" / "ComfyUI", cache / "comfyui" / "venv" / "bin" / "python",
                      cache / "comfyui-models", cache / "comfyui-typed-models")
    if not ((install.comfy_dir / "main.py").is_file() and install.python.is_file()
            and (install.models / "checkpoints" / TINY_CHECKPOINT).is_file()
            and (install.typed_models / ".diffbox-stamp").is_file()):
        raise RuntimeError(NOT_PREPARED.format(cache=cache))
    return install


def server_args(base: Path) -> list[str]:
    """ComfyUI's flags for a server whose files all live under `base` (also given to the worker
    as DIFFBOX_COMFYUI_ARGS, so it finds them when it starts ComfyUI itself)."""
    return ["--cpu", *(arg for name in ("input", "output", "temp", "user")
                       for arg in (f"--{name}-directory", str(base / name)))]


def prepare_folders(base: Path, install: Install, models: bool = True) -> Path:
    """`base`'s folders, with the tiny models and the typed workflows' stand-ins linked into
    models/ (unless `models` is false); returns the model paths config."""
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir(parents=True, exist_ok=True)
    for name in COMFY_FOLDERS:
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    linked = [*install.models.glob("*/*.safetensors"), *install.typed_models.glob("*/*.safetensors")]
    for model in linked if models else ():
        link = base / "models" / model.parent.name / model.name
        if not link.exists():
            link.symlink_to(model)
    return write_extra_model_paths(base / "models", base / CONFIG_NAME)


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIFFBOX_", "RUNPOD_", "VIRTUAL_ENV", "PYTHONPATH"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class RealComfyUI:
    url: str
    base_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        processes.stop(self.proc, 20)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(f"{url}/system_stats", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"ComfyUI not ready in {timeout_s:.0f} s:\n{log_path.read_text(errors='replace')[-3000:]}")


@contextmanager
def start_real_comfyui(install: Install, base: Path, port: int, models: bool = True) -> Iterator[RealComfyUI]:
    config = prepare_folders(base, install, models)
    log_path = base / "comfyui.log"
    argv = [str(install.python), "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--extra-model-paths-config", str(config), *server_args(base)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=install.comfy_dir, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    server = RealComfyUI(f"http://127.0.0.1:{port}", base, proc, log_path)
    try:
        wait_ready(server.url, proc, log_path)
        yield server
    finally:
        server.stop()
