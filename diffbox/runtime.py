"""The worker's process-wide state: settings and backends, made once at cold start.

Both adapters import this; it starts the configured backends as soon as it loads, so
ComfyUI (and vLLM) boot while the platform is still connecting, and the first job only
waits for what is left of their start-up.
"""

from __future__ import annotations

import functools

from . import logs
from .config import Settings
from .service import Service


@functools.cache
def service() -> Service:
    logs.setup()
    instance = Service(Settings.from_env())
    instance.start()
    return instance
