"""Structured, quiet-by-default logging.

Where no terminal is attached (RunPod, Modal, CI): one JSON object per line on stderr, so log
collectors can index the fields. On a terminal: short lines for a person (log_human.py).
`DIFFBOX_LOG_FORMAT` (`json`, `human`) forces either; `DIFFBOX_LOG_LEVEL` sets the level
(default INFO: one line per job and per backend event). Nothing here ever formats request
payloads: callers log ids, sizes and timings only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from .log_human import HumanFormatter

LEVEL_VAR = "DIFFBOX_LOG_LEVEL"
FORMAT_VAR = "DIFFBOX_LOG_FORMAT"
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


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time, so a live progress bar that takes over
    stderr (rich's) prints each line above the bar instead of being torn by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def formatter(env: Mapping[str, str] = os.environ) -> logging.Formatter:
    """Human lines on a terminal, JSON elsewhere; FORMAT_VAR `human` or `json` forces one."""
    chosen = env.get(FORMAT_VAR, "").strip().lower()
    if chosen == "human" or (chosen != "json" and sys.stderr.isatty()):
        return HumanFormatter()
    return JsonFormatter()


def setup(level: str | None = None) -> None:
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = _Stderr()
    handler.setFormatter(formatter())
    root = logging.getLogger("diffbox")
    root.addHandler(handler)
    root.setLevel((level or os.environ.get(LEVEL_VAR, "INFO")).upper())
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
