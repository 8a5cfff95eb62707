"""How much of ComfyUI's start a CPU memory snapshot can hold: its start whole, then in the two
halves the Modal worker uses (runtime.py, comfyui_preload.py).

    uv run python bench/comfyui_start.py --comfyui-dir COMFYUI --python COMFYUI_VENV/bin/python \
        [--args "--cpu"] [--runs 2]

Per run prints: seconds from process start to ComfyUI answering `/system_stats` when started
whole; the first half's seconds (what a snapshot holds: torch and the packages that need no
GPU imported); and the second half's (what a container restored from the snapshot still
waits for). ComfyUI's input/output/user folders go to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffbox.backends.comfyui_server import ComfyServer  # noqa: E402
from diffbox.config import Settings  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(args: argparse.Namespace, work: Path) -> ComfyServer:
    folders = []
    for name in ("input", "output", "temp", "user"):
        (work / name).mkdir(exist_ok=True)
        folders.append(f"--{name}-directory={work / name}")
    return ComfyServer(Settings(comfyui_dir=args.comfyui_dir, comfyui_python=args.python, comfyui_port=_free_port(),
                                comfyui_args=[*shlex.split(args.args), *folders], work_dir=work / "work",
                                models_dir=work / "no-models", startup_timeout_s=600))


def _ready_after(server: ComfyServer, t0: float) -> float:
    server.supervisor.ensure_ready(600)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-dir", type=Path, required=True)
    parser.add_argument("--python", required=True, help="ComfyUI's interpreter")
    parser.add_argument("--args", default="--cpu", help="ComfyUI's own arguments (default: --cpu)")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            whole = _server(args, work)
            t0 = time.monotonic()
            whole.supervisor.start()
            try:
                whole_s = _ready_after(whole, t0)
            finally:
                whole.supervisor.stop()
            halves = _server(args, work)
            t0 = time.monotonic()
            try:
                if not halves.preload(600):
                    sys.exit("the preload failed: see the log lines above")
                first_s = time.monotonic() - t0
                t1 = time.monotonic()
                halves.release()
                second_s = _ready_after(halves, t1)
            finally:
                halves.supervisor.stop()
        print(f"run {run}: whole {whole_s:.1f} s; first half {first_s:.1f} s (snapshot), "
              f"second half {second_s:.1f} s (after restore)", flush=True)
    print(f"cpu count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
