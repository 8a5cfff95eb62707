"""ComfyUI and its custom nodes at the commits pinned in `workflows/comfyui.json`, and a venv
with their requirements: `{dest}/ComfyUI`, `{dest}/ComfyUI/custom_nodes/{name}`, `{dest}/venv`.

The same command makes the Docker image's install, `make run`'s local one and the tests' real
ComfyUI, so all run the same code. Checkouts come from GitHub, or from local sources
(local_source.py) where GitHub is out of reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffbox.workflows.graph import WORKFLOWS_DIR

from . import BuildError, local_source

PINS = WORKFLOWS_DIR / "comfyui.json"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A torch, torchvision and torchaudio release that go together; ComfyUI's requirements name
# them unpinned, so whichever is installed first is what it runs on.
TORCH_PACKAGES = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1")
# `--torch-index default`: torch from the installer's own index (PyPI or its configured mirror).
DEFAULT_INDEX = "default"
INSTALLERS = ("uv", "pip")
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
_PROJECT = re.compile(r"\s*([A-Za-z0-9_.-]+)")
# Imported by ComfyUI (app/frontend_management.py) but not in its requirements.txt at 0.3.64:
# transformers 4 brought it along, transformers 5 does not.
UNDECLARED = ("requests",)
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


def _without_torch(requirements: Sequence[Path], out: Path) -> Path:
    """The requirements minus their torch lines: the torch installed first is what ComfyUI runs
    on, and an unpinned `torchaudio` line would pull a release built for another torch."""
    lines = [line for r in requirements for line in r.read_text().splitlines()
             if (m := _PROJECT.match(line)) is None or m[1].lower() not in TORCH_FAMILY]
    out.write_text("\n".join(lines) + "\n")
    return out


def install_deps(dest: Path, comfy: Path, nodes: list[Path], torch_index: str | None,
                 torch_packages: Sequence[str], installer: str | None = None) -> Path:
    """`{dest}/venv` with torch (from `torch_index` when given, first), then ComfyUI's and each
    node's requirements.txt in one resolution. Returns the venv's python.

    `installer` is uv (the default when on PATH) or pip; pip honours pip.conf (find-links, a
    local mirror) where uv does not."""
    venv = dest / "venv"
    python = venv / "bin" / "python"
    requirements = [p / "requirements.txt" for p in [comfy, *nodes] if (p / "requirements.txt").is_file()]
    stamp = {"torch_index": torch_index, "torch": list(torch_packages), "undeclared": list(UNDECLARED),
             "requirements": {str(r): hashlib.sha256(r.read_bytes()).hexdigest() for r in requirements}}
    stamp_path = venv / _STAMP
    if python.exists() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        print(f"{venv}: requirements already installed", flush=True)
        return python
    uv = shutil.which("uv") if installer in (None, "uv") else None
    if installer == "uv" and uv is None:
        raise BuildError("--installer uv: uv is not on PATH")
    if not python.exists():
        _run([uv, "venv", "-q", "--python", sys.executable, str(venv)] if uv
             else [sys.executable, "-m", "venv", str(venv)])
    pip = [uv, "pip", "install", "--python", str(python)] if uv else [str(python), "-m", "pip", "install"]
    if torch_index == DEFAULT_INDEX:
        _run([*pip, *torch_packages])
    elif torch_index:
        _run([*pip, *torch_packages, "--index-url", torch_index])
    if torch_index and requirements:
        requirements = [_without_torch(requirements, venv / "requirements.diffbox.txt")]
    if requirements:
        _run([*pip, *[arg for r in requirements for arg in ("-r", str(r))], *UNDECLARED])
    stamp_path.write_text(json.dumps(stamp))
    return python


def install(dest: Path, *, pins: Path = PINS, cpu: bool = False, torch_index: str | None = None,
            torch_packages: Sequence[str] = TORCH_PACKAGES, deps: bool = True,
            sources: Sequence[Path] = (), installer: str | None = None) -> Path:
    """ComfyUI and its nodes into `dest` (and their venv unless `deps` is false); returns
    the ComfyUI folder. With `sources`, every checkout comes from them (local_source.py) and
    nothing from GitHub."""
    core, nodes = load_pins(pins)
    comfy = dest / "ComfyUI"
    targets = [(core, comfy), *((node, comfy / "custom_nodes" / node.name) for node in nodes)]
    found = local_source.discover(sources, {spec.name for spec, _ in targets}) if sources else {}
    for spec, target in targets:
        if sources:
            source = local_source.choose(spec.name, spec.commit, found, sources)
            placed = local_source.place(source, target)
            print(f"{spec.name}: {'from' if placed else 'already from'} {source.describe(spec.commit)}", flush=True)
        else:
            try:
                checkout(spec, target)
            except BuildError as exc:
                raise BuildError(f"{exc}\n  without GitHub, install from local sources: --source DIR_OR_ARCHIVE "
                                 f"or {local_source.ENV_VAR} (see `python -m builder comfyui --help`)") from exc
    if deps:
        install_deps(dest, comfy, [t for _, t in targets[1:]], torch_index or (TORCH_CPU_INDEX if cpu else None),
                     torch_packages, installer)
    return comfy
