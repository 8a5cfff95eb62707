"""The worker's process-wide state: settings and backends, made once at cold start.

Both adapters import this; it starts the configured backends as soon as it loads, so
ComfyUI (and vLLM) boot while the platform is still connecting, and the first job only
waits for what is left of their start-up.
"""

from __future__ import annotations

import atexit
import functools

from . import logs
from .config import Settings
from .memory import release_free_memory
from .service import Service


@functools.cache
def service() -> Service:
    logs.setup()
    instance = Service(Settings.from_env())
    # The backends run in sessions of their own, so no signal to the worker reaches them:
    # stop them when it exits (vLLM would otherwise keep its memory and port).
    atexit.register(instance.stop)
    instance.start()
    instance.warm_up()  # before the platform hands this worker a job
    release_free_memory()  # what start-up and warm-up freed
    return instance
