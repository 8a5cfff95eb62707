"""Work put off until a moment after a job's result, and finished first when the worker stops.

A job's clean-up in ComfyUI (its files, its history entry) runs a moment after the result, so
that the result does not wait for it (service.py). A worker that stops in that moment (the
`diffbox` command after its one job, a platform's shutdown) must let it finish first: its
ComfyUI would otherwise be gone under the clean-up's requests. The timers' threads may be
daemon threads (they inherit it from the thread that ran the job), which the interpreter does
not wait for at exit: `flush` does.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

FLUSH_WAIT_S = 10.0  # a clean-up's requests have short timeouts; a stop never hangs on one


class Deferred:
    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._pending: dict[int, Callable[[], None]] = {}
        self._running = 0
        self._keys = itertools.count()
        self._changed = threading.Condition()

    def later(self, work: Callable[[], None], name: str) -> None:
        """Run `work` on a thread of its own after the delay, or in `flush`, whichever is first."""
        key = next(self._keys)
        with self._changed:
            self._pending[key] = work
        timer = threading.Timer(self._delay_s, self._run, (key,))
        timer.name = name
        timer.start()

    def flush(self) -> None:
        """Run here what has not started yet, and wait for what has."""
        with self._changed:
            pending, self._pending = list(self._pending.values()), {}
        for work in pending:
            work()
        with self._changed:
            self._changed.wait_for(lambda: self._running == 0, FLUSH_WAIT_S)

    def _run(self, key: int) -> None:
        with self._changed:
            work = self._pending.pop(key, None)
            if work is None:
                return
            self._running += 1
        try:
            work()
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()
