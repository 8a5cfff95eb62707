"""The kernel's page cache, as prefetching weights needs to see it: how much of a stretch of a
file is cached already (mincore), and how much memory is free to cache more.

Linux only; elsewhere nothing counts as cached and no memory as free beyond what the caller
assumes (`free_bytes` returns None), so prefetching reads everything or does not start.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path
from typing import Any

_PROT_READ, _MAP_SHARED = 0x1, 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value
# A cgroup's limit when it has none: v1 says 2**63 rounded down to a page, v2 says "max".
_NO_LIMIT = 1 << 60


@functools.cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def cached_bytes(fd: int, offset: int, length: int) -> int:
    """Bytes of `fd`'s [offset, offset + length) in the page cache; `offset` a multiple of the
    page size. 0 where that cannot be told (then the caller reads, which costs only time)."""
    libc = _libc()
    if libc is None or length <= 0:
        return 0
    # Mapping a file reads nothing: mincore only looks at the cache's pages behind the mapping.
    address = libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, offset)
    if address in (None, _MAP_FAILED):
        return 0
    try:
        pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, length, vector) != 0:
            return 0
        resident = sum(byte & 1 for byte in vector)
    finally:
        libc.munmap(address, length)
    return min(resident * mmap.PAGESIZE, length)


def _meminfo_free(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if not text.isdigit() else int(text)


def _cgroup_headroom(root: Path, proc_cgroup: Path) -> int | None:
    """What this process's memory cgroup lets it use beyond what it (page cache included) uses,
    or None where it sets no limit. A container's limit is often far below the host's memory,
    which is all /proc/meminfo shows."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if number == "0" and controllers == "":
            limit, usage = root / relative / "memory.max", root / relative / "memory.current"
        elif "memory" in controllers.split(","):
            limit, usage = root / "memory" / relative / "memory.limit_in_bytes", \
                root / "memory" / relative / "memory.usage_in_bytes"
        else:
            continue
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < _NO_LIMIT:
            return max(cap - used, 0)
    return None


def free_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
               proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory no one uses, not even the page cache: the machine's MemFree, or less where the
    container's memory cgroup allows less. None where neither can be read."""
    known = [v for v in (_meminfo_free(meminfo), _cgroup_headroom(cgroup_root, proc_cgroup)) if v is not None]
    return min(known) if known else None
