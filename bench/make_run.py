"""`make run` from start to summary, with an installed ComfyUI, and where the time goes.

    DIFFBOX_COMFYUI_DIR=/path/to/ComfyUI DIFFBOX_COMFYUI_PYTHON=/path/to/venv/bin/python \
        uv run python bench/make_run.py --runs 3

Runs `make run RUN_OUT=<a temporary folder>` as a user would (the worker starts that ComfyUI
with `--cpu`) and prints, per run: the wall time from `make` starting to the summary printed,
split by the worker's own log lines into our start-up (to ComfyUI launched), ComfyUI's boot
(to it answering), the job, and the rest (saving, the summary, stopping ComfyUI); the CPU time
of everything it ran; and the load average, since other work on the machine stretches all of
it. Target: under 20 s on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The worker's log lines that mark the phases (diffbox.logs writes one JSON object a line where no
# terminal is attached, as here: stderr is a pipe).
MARKS = {"backend started": "launched", "backend ready": "ready", "job done": "done"}


def _marks(log: str) -> dict[str, float]:
    found = {}
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (mark := MARKS.get(event.get("msg"))) and mark not in found:
                found[mark] = float(event["ts"])
    return found


def run_once(out: Path) -> dict[str, float]:
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    done = subprocess.run(["make", "run", f"RUN_OUT={out}"], cwd=REPO, capture_output=True, text=True)
    t1 = time.time()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "saved in" not in done.stdout:
        raise SystemExit(f"make run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    marks = _marks(done.stderr)
    missing = {"launched", "ready", "done"} - set(marks)
    if missing:
        raise SystemExit(f"no {', '.join(sorted(missing))} in the worker's log (set DIFFBOX_COMFYUI_DIR?)")
    return {"wall_s": t1 - t0, "startup_s": marks["launched"] - t0,
            "comfyui_boot_s": marks["ready"] - marks["launched"], "job_s": marks["done"] - marks["ready"],
            "rest_s": t1 - marks["done"],
            "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "load_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not os.environ.get("DIFFBOX_COMFYUI_DIR"):
        raise SystemExit("set DIFFBOX_COMFYUI_DIR (and DIFFBOX_COMFYUI_PYTHON): an installed ComfyUI")
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.runs):
            figures = run_once(Path(tmp) / f"out{index}")
            print("  ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
