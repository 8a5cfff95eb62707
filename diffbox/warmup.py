"""Warm-up at cold start (`DIFFBOX_WARMUP=i2v:fast,qwen_edit:fast`).

Each entry is `workflow[:preset][:model]`. Before the worker takes jobs it runs, per entry, the
smallest request that still loads every weight file of that workflow and preset (a 256x256
image, a few frames, the fewest steps), so that the first user's job finds the models in
memory. A failure is logged and skipped: the worker still serves, its first job just pays for
the loading. The time spent is logged and reported once, in the first result's timings.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from . import logs

log = logs.get("warmup")

RunJob = Callable[[str, dict[str, Any]], dict[str, Any]]
_PRESETS = ("fast", "quality")
_SIZE = {"width": 256, "height": 256}


def _image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _requests(image: str) -> dict[str, dict[str, Any]]:
    return {
        "i2v": {"image": image, "prompt": "warm-up", "frames": 5, "steps": 2, **_SIZE},
        "svi": {"image": image, "prompt": "warm-up", "clips": 1, "frames_per_clip": 9, "steps": 2, **_SIZE},
        "qwen_edit": {"images": [image], "prompt": "warm-up", "steps": 1, **_SIZE},
    }


def request_for(spec: str) -> dict[str, Any]:
    """The warm-up request of one `workflow[:preset][:model]` entry."""
    name, *options = spec.split(":")
    requests = _requests(_image())
    if name not in requests:
        raise ValueError(f"DIFFBOX_WARMUP: no warm-up for {name!r}; known: {', '.join(sorted(requests))}")
    payload: dict[str, Any] = {"workflow": name, **requests[name], "output": {"store": "inline"}}
    for option in options:
        payload["preset" if option in _PRESETS else "model"] = option
    return payload


def warm_up(specs: list[str], serves: Callable[[str], bool], run: RunJob) -> dict[str, float]:
    """Run each entry's request through `run`; returns the timings to report."""
    total: float | None = None
    for spec in specs:
        name = spec.split(":")[0]
        if not serves(name):
            logs.event(log, "warm-up skipped: workflow not served here", level=30, spec=spec)
            continue
        t0 = time.monotonic()
        try:
            result = run(f"warmup-{spec.replace(':', '-')}", request_for(spec))
        except ValueError as exc:
            logs.event(log, "warm-up skipped", level=30, spec=spec, error=str(exc))
            continue
        elapsed = logs.since(t0)
        total = (total or 0.0) + elapsed
        error = result.get("error")
        if error:
            logs.event(log, "warm-up failed", level=30, spec=spec, seconds=elapsed,
                       error_type=error.get("type"), error=error.get("message"))
        else:
            logs.event(log, "warm-up done", spec=spec, seconds=elapsed)
    return {} if total is None else {"warmup_s": round(total, 3)}
