"""Checkouts from this disk instead of GitHub, for `python -m builder comfyui --source`.

A source is a `.tar.gz` of a repository tree whose top folder is the checkout's name and whose
file name says the commit (`ComfyUI-a125cd8.tar.gz` holding `ComfyUI/...`, as
`git archive --prefix=ComfyUI/ a125cd8 | gzip` makes it), a folder holding a tree named as the
checkout (`ComfyUI/`, `ComfyUI-KJNodes/`), or a folder holding any number of those. Machines that
reach the package registries but not GitHub (CI here) install from such a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import BuildError

ENV_VAR = "DIFFBOX_COMFYUI_SOURCE"
ARCHIVE_NAME = re.compile(r"^(?P<name>.+)-(?P<commit>[0-9a-f]{7,40})\.tar\.gz$")
MARKER = ".diffbox-source.json"


@dataclass(frozen=True)
class LocalSource:
    name: str
    path: Path
    commit: str | None  # from the archive's name or the tree's git HEAD; None when nothing says

    def describe(self, pinned: str) -> str:
        if self.commit is None:
            return f"{self.path} (commit unknown; the pin is {pinned[:12]})"
        if pinned.startswith(self.commit) or self.commit.startswith(pinned):
            return f"{self.path} (the pinned commit {pinned[:12]})"
        return f"{self.path} (commit {self.commit[:12]}, NOT the pinned {pinned[:12]})"


def from_environment() -> list[Path]:
    """`DIFFBOX_COMFYUI_SOURCE`: paths separated as in PATH."""
    return [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def _git_head(tree: Path) -> str | None:
    if not (tree / ".git").exists():
        return None
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def _as_source(path: Path, names: set[str]) -> LocalSource | None:
    if path.is_file():
        match = ARCHIVE_NAME.match(path.name)
        if match and match["name"] in names:
            return LocalSource(match["name"], path, match["commit"])
        return None
    if path.is_dir() and path.name in names:
        return LocalSource(path.name, path, _git_head(path))
    return None


def discover(paths: Iterable[Path], names: set[str]) -> dict[str, list[LocalSource]]:
    """The sources under `paths` for each checkout name."""
    found: dict[str, list[LocalSource]] = {}
    for path in paths:
        if not path.exists():
            raise BuildError(f"source {path} does not exist")
        direct = _as_source(path, names)
        inside = [] if direct or not path.is_dir() else [_as_source(child, names) for child in sorted(path.iterdir())]
        for source in [direct, *inside]:
            if source is not None:
                found.setdefault(source.name, []).append(source)
    return found


def choose(name: str, pinned: str, found: dict[str, list[LocalSource]], paths: Sequence[Path]) -> LocalSource:
    options = found.get(name, [])
    if not options:
        where = ", ".join(str(p) for p in paths)
        raise BuildError(f"no source for {name} in {where}: give its tree (a folder named {name}) or an "
                         f"archive {name}-COMMIT.tar.gz, or no --source and no {ENV_VAR} to fetch from GitHub")
    exact = [s for s in options if s.commit and (pinned.startswith(s.commit) or s.commit.startswith(pinned))]
    if exact:
        return exact[0]
    if len(options) > 1:
        raise BuildError(f"several sources for {name} and none at the pinned {pinned[:12]}: "
                         + ", ".join(str(s.path) for s in options))
    return options[0]


def _fingerprint(source: LocalSource) -> dict[str, str | None]:
    digest = hashlib.sha256(source.path.read_bytes()).hexdigest() if source.path.is_file() else None
    return {"source": str(source.path.resolve()), "commit": source.commit, "sha256": digest}


def place(source: LocalSource, target: Path) -> bool:
    """`target` holds `source`'s tree; False when it already did (same archive bytes). A target
    that this function did not fill is never deleted."""
    marker = target / MARKER
    stamp = _fingerprint(source)
    if marker.is_file():
        if stamp["sha256"] is not None and json.loads(marker.read_text()) == stamp:
            return False
        shutil.rmtree(target)
    elif target.exists() and any(target.iterdir()):
        raise BuildError(f"{target} exists and was not installed from a local source; move it away")
    if source.path.is_file():
        _unpack(source, target)
    else:
        shutil.copytree(source.path, target, symlinks=True, ignore=shutil.ignore_patterns(".git"),
                        dirs_exist_ok=True)
    marker.write_text(json.dumps(stamp))
    return True


def _unpack(source: LocalSource, target: Path) -> None:
    staging = target.with_name(target.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            with tarfile.open(source.path) as archive:
                _extract(archive, staging)
        except (tarfile.TarError, OSError) as exc:
            raise BuildError(f"{source.path}: cannot unpack: {exc}") from exc
        top = staging / source.name
        if not top.is_dir() or len(list(staging.iterdir())) != 1:
            raise BuildError(f"{source.path}: expected one top folder named {source.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmdir()
        top.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: tarfile.TarFile, staging: Path) -> None:
    """The "data" filter refuses absolute paths, links out of the tree and device files. Python
    before 3.11.4 has no filters (Debian bookworm's 3.11.2, an image's system Python): the same
    refusals are made here before extracting."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(staging, filter="data")
        return
    root = staging.resolve()
    for member in archive.getmembers():
        path = (root / member.name).resolve()
        if member.issym():
            linked = (path.parent / member.linkname).resolve()
        elif member.islnk():
            linked = (root / member.linkname).resolve()
        else:
            linked = path
        plain = member.isfile() or member.isdir() or member.issym() or member.islnk()
        if not plain or not path.is_relative_to(root) or not linked.is_relative_to(root):
            raise tarfile.TarError(f"{member.name}: not a file, folder or link inside the tree")
    archive.extractall(staging)
