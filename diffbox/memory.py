"""Give the memory a job freed back to the system, so an idle worker's RSS stays low.

glibc keeps freed heap memory (per thread arena) for reuse; `malloc_trim` returns what it can.
Elsewhere (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def _trim() -> Callable[[int], Any] | None:
    try:
        # The process's own symbols: libc's, without looking for its file.
        trim: Callable[[int], Any] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    return trim


def release_free_memory() -> None:
    trim = _trim()
    if trim is not None:
        trim(0)  # ctypes lets go of the GIL for the call: other threads run meanwhile
