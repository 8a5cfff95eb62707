"""Work put off until after a job's result (diffbox/deferred.py): done once, and finished
before a stopping worker goes on."""

from __future__ import annotations

import threading

from diffbox.deferred import Deferred


def test_flush_runs_what_has_not_started_and_only_once() -> None:
    ran: list[str] = []
    deferred = Deferred(60.0)
    deferred.later(lambda: ran.append("a"), "test-a")
    deferred.flush()
    assert ran == ["a"]
    deferred.flush()
    assert ran == ["a"]


def test_flush_waits_for_what_has_started() -> None:
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        ended.set()

    deferred = Deferred(0.0)
    deferred.later(work, "test-started")
    assert started.wait(10)
    flushed = threading.Event()
    threading.Thread(target=lambda: (deferred.flush(), flushed.set()), daemon=True).start()
    assert not flushed.wait(0.2)  # still running: flush waits
    release.set()
    assert flushed.wait(10) and ended.is_set()
