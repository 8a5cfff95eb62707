"""Dockerfile.serverless, read with dockerfile_parse (no Docker daemon here): what it copies
exists, every variable it uses is declared, and code changes can't reach the weights layer."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile.serverless"
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
# Set by the base image, not by this file.
_INHERITED = {"PATH"}


def _instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(fileobj=DOCKERFILE.open("rb"), env_replace=False)
    structure: list[dict[str, Any]] = parser.structure
    return structure


def _copy_sources(value: str) -> tuple[list[str], bool]:
    """A COPY's sources, and whether it copies from another image or stage."""
    words = value.split()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], any(f.startswith("--from") for f in flags)


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignored = _dockerignore()
    copied = 0
    for ins in _instructions():
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        sources, other_stage = _copy_sources(ins["value"])
        if other_stage:
            continue
        for source in sources:
            matches = glob.glob(source, root_dir=REPO)
            assert matches, f"line {ins['startline'] + 1}: {source} does not exist"
            assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored), source
            copied += 1
    assert copied >= 5


def test_every_variable_used_is_declared_and_every_build_arg_is_used() -> None:
    global_args: set[str] = set()
    scope: set[str] | None = None  # None until the first FROM
    declared_args: set[str] = set()
    used: set[str] = set()
    for ins in _instructions():
        kind, value, line = ins["instruction"], ins["value"], ins["startline"] + 1
        refs = set(_VAR.findall(value))
        if kind == "ARG":
            name = value.split("=", 1)[0].strip()
            (global_args if scope is None else scope).add(name)
            declared_args.add(name)
            refs = set(_VAR.findall(value.split("=", 1)[1])) if "=" in value else set()
        if kind == "FROM":
            assert refs <= global_args, f"line {line}: {refs - global_args} not declared before FROM"
            scope = set()
        elif scope is not None:
            undeclared = refs - scope - _INHERITED
            assert not undeclared, f"line {line}: {sorted(undeclared)} used but not declared in this stage"
            if kind == "ENV":
                scope.update(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", value))
        used |= refs
    assert {"MODELS", "PRESETS", "WITH_VLLM", "VLLM_VERSION", "CHAT_MODEL"} <= declared_args
    assert declared_args <= used, f"build args that change nothing: {declared_args - used}"


def _layers() -> list[tuple[str, str]]:
    return [(ins["instruction"], ins["value"]) for ins in _instructions()]


def test_weights_come_before_the_package_source_and_cmd_starts_the_handler() -> None:
    layers = _layers()
    weights = next(i for i, (kind, value) in enumerate(layers) if kind == "RUN" and "builder download" in value)
    source = layers.index(("COPY", "diffbox/ diffbox/"))
    assert weights < source
    assert "uv sync --frozen --no-dev" in " ".join(v for k, v in layers[source:] if k == "RUN")
    before = [v for k, v in layers[:weights] if k == "COPY" and "--from" not in v]
    # Nothing copied before the weights is a whole source tree.
    assert not [v for v in before if v.split()[0] in (".", "./", "diffbox/", "diffbox")]
    assert layers[-1] == ("CMD", '["python", "-u", "handler.py"]')


def test_the_files_copied_before_the_weights_are_enough_to_run_the_builder(tmp_path: Path) -> None:
    """The weights layer runs `python -m builder` with only what is copied before it: if an
    import is added to the builder or the manifest module, this names what to copy."""
    layers = _layers()
    weights = next(i for i, (kind, value) in enumerate(layers) if kind == "RUN" and "builder download" in value)
    for kind, value in layers[:weights]:
        if kind == "COPY" and "--from" not in value:
            sources, target = value.split()[:-1], value.split()[-1]
            for source in sources:
                dest = tmp_path / target
                if source.endswith("/"):
                    shutil.copytree(REPO / source, dest, dirs_exist_ok=True)
                else:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, dest)
        if kind == "RUN" and value.startswith("touch "):
            for name in value.split()[1:]:
                (tmp_path / name).touch()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = ("import runpy, sys; sys.argv = ['builder', 'plan', '--workflows', 'i2v', '--presets', 'fast'];"
             f"import diffbox; assert diffbox.__file__.startswith({str(tmp_path)!r}), diffbox.__file__;"
             "runpy.run_module('builder', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 files" in result.stdout


def test_without_build_args_the_image_comes_from_the_sources_runpod_users_build_from() -> None:
    """The image test (docs/image-test.md) replaces these through build arguments only."""
    defaults = {}
    for ins in _instructions():
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            name, value = ins["value"].split("=", 1)
            defaults.setdefault(name, value.strip('"'))
    assert defaults["CUDA_IMAGE"] == "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"
    assert defaults["UV_IMAGE"] == "ghcr.io/astral-sh/uv:0.13.8"
    assert defaults["UV_PYTHON_PREFERENCE"] == "only-managed"
    assert defaults["TORCH_INDEX"] == "https://download.pytorch.org/whl/cu128"
    assert defaults["COMFYUI_SOURCES"] == "scratch"  # ComfyUI and its nodes from GitHub
    # A `# syntax=` line makes BuildKit pull a frontend image: not every builder can.
    assert not DOCKERFILE.read_text().startswith("# syntax")
