"""Log lines for a person at a terminal: `12:04:31 INFO  comfyui ready  port=8188 seconds=9.8`.

The time, the level, the message and the record's fields as `key=value`, each value cut to
one short line; a traceback follows on its own lines. JSON lines (logs.JsonFormatter) stay
the format where no terminal is attached.
"""

from __future__ import annotations

import logging
import time
from typing import Any

MAX_VALUE = 80


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, int | float) else str(value)
    text = " ".join(text.split())
    if " " in text or not text:
        text = repr(text)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{clock} {record.levelname:<5} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += "  " + " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line
