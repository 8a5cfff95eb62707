"""Log lines: short human ones on a terminal, JSON where no terminal is attached, and
DIFFBOX_LOG_FORMAT forcing either. Each case runs a fresh interpreter, as a worker starts."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

SCRIPT = """
import logging
from diffbox import logs
logs.setup()
logs.event(logs.get("test"), "comfyui ready", port=8188, seconds=9.8, note="two words")
try:
    raise RuntimeError("boom")
except RuntimeError:
    logs.get("test").exception("job failed", extra={"fields": {"job_id": "j1"}})
"""


def _stderr(fmt: str | None, terminal: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DIFFBOX_LOG_FORMAT"}
    if fmt is not None:
        env["DIFFBOX_LOG_FORMAT"] = fmt
    if not terminal:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        return done.stderr
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _is_human(text: str) -> None:
    first = text.splitlines()[0]
    clock, level, rest = first.split(" ", 2)
    assert len(clock) == 8 and clock.count(":") == 2
    assert level == "INFO"
    assert rest.strip() == "comfyui ready  port=8188 seconds=9.8 note='two words'"
    assert "ERROR job failed  job_id=j1" in text
    assert "RuntimeError: boom" in text  # the traceback follows on its own lines
    assert not text.lstrip().startswith("{")


def _is_json(text: str) -> None:
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["msg"] == "comfyui ready" and lines[0]["port"] == 8188 and lines[0]["level"] == "info"
    assert lines[1]["job_id"] == "j1" and "RuntimeError: boom" in lines[1]["exc"]


def test_a_terminal_gets_human_lines() -> None:
    _is_human(_stderr(None, terminal=True))


def test_no_terminal_gets_json_lines() -> None:
    _is_json(_stderr(None, terminal=False))


@pytest.mark.parametrize("terminal", [True, False])
def test_the_variable_forces_either(terminal: bool) -> None:
    _is_json(_stderr("json", terminal))
    _is_human(_stderr("human", terminal))
