"""ComfyUI and its custom nodes at the commits pinned in `workflows/comfyui.json`, and a venv
with their requirements: `{dest}/ComfyUI`, `{dest}/ComfyUI/custom_nodes/{name}`, `{dest}/venv`.

The same command makes the Docker image's install and `make run`'s local one, so both run
the code the tests were recorded against.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffbox.workflows.graph import WORKFLOWS_DIR

from . import BuildError

PINS = WORKFLOWS_DIR / "comfyui.json"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A torch, torchvision and torchaudio release that go together; ComfyUI's requirements name
# them unpinned, so whichever is installed first is what it runs on.
TORCH_PACKAGES = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1")
_STAMP = ".diffbox-deps.json"


@dataclass(frozen=True)
class Checkout:
    name: str
    repo: str
    commit: str


def load_pins(path: Path = PINS) -> tuple[Checkout, list[Checkout]]:
    data = json.loads(path.read_text())
    core = data["comfyui"]
    nodes = [Checkout(n["name"], n["repo"], n["commit"]) for n in data.get("custom_nodes", [])]
    for node in nodes:
        if "/" in node.name or node.name.startswith("."):
            raise BuildError(f"{path}: custom node name {node.name!r} must be a plain folder name")
    return Checkout("ComfyUI", core["repo"], core["commit"]), nodes


def _run(argv: Sequence[str], cwd: Path | None = None, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(a) for a in argv), flush=True)
    # No credential prompt: a wrong or private URL fails instead of waiting for a terminal.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(list(argv), cwd=cwd, env=env, text=True, check=False,
                            capture_output=quiet)
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-5:] if quiet else []
        raise BuildError(f"`{' '.join(argv)}` failed with exit code {result.returncode}"
                         + ("".join(f"\n  {line}" for line in tail)))
    return result


def _head(target: Path) -> str | None:
    result = subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def checkout(spec: Checkout, target: Path) -> None:
    """`target` as a git work tree at `spec.commit`; nothing is fetched when it already is."""
    if (target / ".git").exists():
        if _head(target) == spec.commit:
            print(f"{spec.name}: at {spec.commit[:12]}", flush=True)
            return
        _run(["git", "-C", str(target), "remote", "set-url", "origin", spec.repo])
    else:
        if target.exists() and any(target.iterdir()):
            raise BuildError(f"{target} exists and is not a git checkout; move it away")
        target.mkdir(parents=True, exist_ok=True)
        _run(["git", "init", "-q", str(target)])
        _run(["git", "-C", str(target), "remote", "add", "origin", spec.repo])
    try:
        # One commit, no history: GitHub serves any reachable commit by its id.
        _run(["git", "-C", str(target), "fetch", "-q", "--depth", "1", "origin", spec.commit], quiet=True)
    except BuildError:
        _run(["git", "-C", str(target), "fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"])
    # A checkout with local edits fails here rather than losing them.
    _run(["git", "-C", str(target), "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", spec.commit])
    if _head(target) != spec.commit:
        raise BuildError(f"{target}: HEAD is not {spec.commit} after checkout")


def install_deps(dest: Path, comfy: Path, nodes: list[Path], torch_index: str | None,
                 torch_packages: Sequence[str]) -> Path:
    """`{dest}/venv` with torch (from `torch_index` when given, first), then ComfyUI's and each
    node's requirements.txt in one resolution. Returns the venv's python."""
    venv = dest / "venv"
    python = venv / "bin" / "python"
    requirements = [p / "requirements.txt" for p in [comfy, *nodes] if (p / "requirements.txt").is_file()]
    stamp = {"torch_index": torch_index, "torch": list(torch_packages),
             "requirements": {str(r): hashlib.sha256(r.read_bytes()).hexdigest() for r in requirements}}
    stamp_path = venv / _STAMP
    if python.exists() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        print(f"{venv}: requirements already installed", flush=True)
        return python
    uv = shutil.which("uv")
    if not python.exists():
        _run([uv, "venv", "-q", "--python", sys.executable, str(venv)] if uv
             else [sys.executable, "-m", "venv", str(venv)])
    pip = [uv, "pip", "install", "--python", str(python)] if uv else [str(python), "-m", "pip", "install"]
    if torch_index:
        _run([*pip, *torch_packages, "--index-url", torch_index])
    if requirements:
        _run([*pip, *[arg for r in requirements for arg in ("-r", str(r))]])
    stamp_path.write_text(json.dumps(stamp))
    return python


def install(dest: Path, *, pins: Path = PINS, cpu: bool = False, torch_index: str | None = None,
            torch_packages: Sequence[str] = TORCH_PACKAGES, deps: bool = True) -> Path:
    """ComfyUI and its nodes into `dest` (and their venv unless `deps` is false); returns
    the ComfyUI folder."""
    core, nodes = load_pins(pins)
    comfy = dest / "ComfyUI"
    checkout(core, comfy)
    node_dirs = []
    for node in nodes:
        target = comfy / "custom_nodes" / node.name
        checkout(node, target)
        node_dirs.append(target)
    if deps:
        install_deps(dest, comfy, node_dirs, torch_index or (TORCH_CPU_INDEX if cpu else None), torch_packages)
    return comfy
