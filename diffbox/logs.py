"""Structured, quiet-by-default logging.

One JSON object per line on stderr, so log collectors (RunPod's, Modal's) can index the
fields. `DIFFBOX_LOG_LEVEL` sets the level (default INFO: one line per job and per backend
event). Nothing here ever formats request payloads: callers log ids, sizes and timings only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_CONFIGURED = False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str | None = None) -> None:
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("diffbox")
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("DIFFBOX_LOG_LEVEL", "INFO")).upper())
    root.propagate = False
    # httpx logs each request's whole URL at INFO, and huggingface_hub downloads through it: the
    # Hub's signed CDN URLs would reach whatever prints the root logger (RunPod's SDK does).
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _CONFIGURED = True


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"diffbox.{name}")


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `msg` with structured `fields` (ids, sizes, timings: never payloads or URLs)."""
    logger.log(level, msg, extra={"fields": fields})


def since(t0: float) -> float:
    return round(time.monotonic() - t0, 3)
