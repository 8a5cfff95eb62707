"""At most one update per interval, except that a change of key (a stage, a sampler starting) always goes out."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last_at: float | None = None
        self._last_key: object = None

    def allow(self, key: object) -> bool:
        now = self.clock()
        if key != self._last_key or self._last_at is None or now - self._last_at >= self.interval_s:
            self._last_at, self._last_key = now, key
            return True
        return False
