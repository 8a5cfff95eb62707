"""A slow volume on this machine: a file system image on a loop device, its reads limited by
the block I/O cgroup controller, for benchmarks of what a worker does on a network volume.

    with throttled_volume(work, size_bytes, rate_bytes_s) as volume:
        copy files under volume.root, then start processes with preexec_fn=volume.join

Only processes that `join` are limited (their page-cache misses become reads of the loop
device, which the cgroup throttles), and the loop device reads its backing file with direct
I/O, so the machine's own page cache does not hide the limit. cgroup v1 (`blkio`,
`throttle.read_bps_device`) and v2 (`io.max`, `rbps=`) are both handled; needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Volume:
    root: Path  # the mounted file system
    procs: Path  # the cgroup's process list

    def join(self) -> None:
        """Put the calling process (a child before its exec) in the throttled cgroup."""
        self.procs.write_text(str(os.getpid()))


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _cgroup(device: str, rate_bytes_s: int) -> Path:
    name = f"diffbox-bench-{uuid.uuid4().hex[:8]}"
    if (CGROUP / "blkio").is_dir():  # v1
        group = CGROUP / "blkio" / name
        group.mkdir()
        (group / "blkio.throttle.read_bps_device").write_text(f"{device} {rate_bytes_s}")
    else:  # v2: the io controller must be on for the root's children
        (CGROUP / "cgroup.subtree_control").write_text("+io")
        group = CGROUP / name
        group.mkdir()
        (group / "io.max").write_text(f"{device} rbps={rate_bytes_s}")
    return group


@contextlib.contextmanager
def throttled_volume(work: Path, size_bytes: int, rate_bytes_s: int) -> Iterator[Volume]:
    if os.geteuid() != 0:
        raise SystemExit("a throttled volume needs root (losetup, mount, cgroups)")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SystemExit(f"a throttled volume needs {tool}")
    image, root = work / "volume.img", work / "volume"
    with image.open("wb") as f:
        f.truncate(size_bytes)
    _run("mkfs.ext4", "-q", "-F", str(image))
    loop = _run("losetup", "--find", "--show", "--direct-io=on", str(image))
    group: Path | None = None
    try:
        root.mkdir()
        _run("mount", loop, str(root))
        try:
            group = _cgroup(_run("lsblk", "-dno", "MAJ:MIN", loop).strip(), rate_bytes_s)
            yield Volume(root, group / "cgroup.procs")
        finally:
            _run("umount", str(root))
    finally:
        _run("losetup", "-d", loop)
        image.unlink()
        if group is not None:
            with contextlib.suppress(OSError):  # the cgroup goes once its processes have
                group.rmdir()
