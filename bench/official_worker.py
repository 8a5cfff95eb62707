"""The official RunPod ComfyUI worker (runpod-workers/worker-comfyui), unmodified, for comparison.

Its `handler.py` (and the `network_volume.py` it imports) are taken with `git show COMMIT:path`
from a clone of its public repository: one given with `--official-src DIR`, else one cloned
into the bench cache. It runs in a venv of its own with its own `requirements.txt` from that
commit, installed from PyPI by uv. Nothing of its code is changed: the handler reads its
ComfyUI address from the module constant `COMFY_HOST` (127.0.0.1:8188, no variable), so the
launcher below imports the module, sets that constant to the bench's ComfyUI, and calls
`runpod.serverless.start({"handler": handler})` exactly as its `__main__` block does.

    git ls-remote https://github.com/runpod-workers/worker-comfyui main   # the newest commit
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_URL = "https://github.com/runpod-workers/worker-comfyui"
# main on 2026-03-20, "chore: version packages (#215)".
PINNED_COMMIT = "d2a557235b3800d68dcc6fa3259125fdf4bed8a6"
FILES = {"handler.py": "handler.py", "network_volume.py": "src/network_volume.py",
         "requirements.txt": "requirements.txt"}
PYTHON = "3.11"

# argv: SOURCE_DIR COMFY_HOST [runpod SDK flags...]
LAUNCHER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); host = sys.argv.pop(1)\n"
    "import runpod, handler\n"
    "handler.COMFY_HOST = host\n"
    "runpod.serverless.start({'handler': handler.handler})\n"
)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFBOX_BENCH_CACHE", Path.home() / ".cache" / "diffbox-bench"))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def clone(official_src: Path | None, commit: str) -> Path:
    """A clone holding `commit`: the given one, or the bench cache's (cloned once)."""
    if official_src is not None:
        return official_src
    path = cache_dir() / "worker-comfyui"
    if not (path / ".git").exists() and not (path / "HEAD").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", REPO_URL, str(path)], check=True)
    if subprocess.run(["git", "-C", str(path), "cat-file", "-e", f"{commit}^{{commit}}"]).returncode != 0:
        subprocess.run(["git", "-C", str(path), "fetch", "--quiet", "origin"], check=True)
    return path


def prepare(official_src: Path | None, commit: str = PINNED_COMMIT) -> tuple[Path, Path]:
    """(folder with the worker's files at `commit`, the python of its own venv)."""
    repo = clone(official_src, commit)
    source = cache_dir() / f"worker-comfyui-{commit[:12]}"
    source.mkdir(parents=True, exist_ok=True)
    for name, path in FILES.items():
        (source / name).write_text(_git("-C", str(repo), "show", f"{commit}:{path}"))
    venv = cache_dir() / f"worker-comfyui-venv-{commit[:12]}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    if not done.exists():
        subprocess.run(["uv", "venv", "--quiet", "--python", PYTHON, str(venv)], check=True)
        subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(python),
                        "-r", str(source / "requirements.txt")], check=True)
        done.write_text(commit)
    return source, python


def command(source: Path, python: Path, comfy_host: str, port: int) -> list[str]:
    """The worker's local API (`--rp_serve_api`) on `port`, talking to ComfyUI at `comfy_host`."""
    return [str(python), "-c", LAUNCHER, str(source), comfy_host, "--rp_serve_api", "--rp_api_port", str(port)]


def installed_versions(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import runpod, websocket, requests; "
                           "print(f'runpod {runpod.__version__}, websocket-client {websocket.__version__}, "
                           "requests {requests.__version__}')"], capture_output=True, text=True).stdout.strip()
