"""Where a cold worker's first `i2v` fast job spends its time, with and without the prefetch
(diffbox/prefetch.py), then a second job on the same, now warm, worker.

    sudo uv run python bench/cold_start.py                  # weights on this machine's own disk
    sudo uv run python bench/cold_start.py --rate-mb 200    # weights on a volume read at 200 MB/s
    sudo uv run python bench/cold_start.py --prefetch off   # one mode only (default: off, then on)

Each run drops the page cache (root), starts `python handler.py` as RunPod runs it (the runpod
SDK's production loop, jobs from tests/fakes/runpod_api.py, outputs to a moto S3), with the
first job already queued, as on RunPod where a queued job is what starts a worker. The worker
starts the real ComfyUI of `make comfyui-env` on the CPU, with the stand-in weights of the typed
workflows (tests/comfyui_env/make_typed_models.py: the text encoder and VAE full size, the
diffusion models tiny), so reads are of real sizes and compute is the CPU's.

Printed per run: when the worker was ready for jobs and when ComfyUI answered (from the
worker's start), the prefetch (bytes it read, seconds, MB/s), each loader node's file (bytes,
seconds, MB/s), text encode, sampling, VAE (encode of the start image and decode), upload,
the first job's total (from the worker's start) and the warm second job's. With `--rate-mb`,
also the goal: max(ComfyUI start, the files' read time at that rate) + the warm job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from slow_volume import throttled_volume  # noqa: E402

from diffbox.model_paths import COMFY_FOLDERS  # noqa: E402
from diffbox.workflows import manifest  # noqa: E402
from tests.conftest import free_port, production_worker  # noqa: E402
from tests.e2e.test_typed_workflows_real import WAN, picture  # noqa: E402
from tests.fakes.runpod_api import FakeRunpodApi  # noqa: E402
from tests.realcomfy import Install, installed, server_args, server_env  # noqa: E402
from tests.s3 import S3Server, start_moto  # noqa: E402

MB = 1000 * 1000  # as storage vendors count
STAGES = {"text encode": ("CLIPTextEncode",), "sampling": ("KSamplerAdvanced",),
          "VAE": ("WanImageToVideo", "VAEDecode")}


def job(seed: int, prompt: str, negative: str) -> dict[str, Any]:
    """Both prompts new, so that the warm job does all the first one's work but the loading
    (ComfyUI would otherwise reuse the default negative prompt's encoding)."""
    return {**WAN, "image": picture(seed), "prompt": prompt, "negative_prompt": negative, "seed": seed,
            "preset": "fast"}


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


@contextlib.contextmanager
def models_dir(args: argparse.Namespace, work: Path, install: Install) -> Iterator[tuple[Path, Callable[[], None]]]:
    """The i2v fast weights in a models folder, on this machine's disk (links to the stand-ins)
    or copied to a throttled volume; and what a process calls to be throttled with them."""
    files = manifest.load().required("i2v", "fast")

    def place(models: Path, put: Callable[[Path, Path], object]) -> Path:
        for f in files:
            f.local_path(models).parent.mkdir(parents=True, exist_ok=True)
            put(f.local_path(install.typed_models), f.local_path(models))
        return models

    if not args.rate_mb:
        yield place(work / "models", lambda source, dest: dest.symlink_to(source)), lambda: None
        return
    size = sum(f.local_path(install.typed_models).stat().st_size for f in files)
    with throttled_volume(work, int(size * 1.1) + 512 * MB, int(args.rate_mb * MB)) as volume:
        yield place(volume.root / "models", shutil.copyfile), volume.join


def worker_env(install: Install, base: Path, models: Path, port: int, prefetch: str, api: FakeRunpodApi,
               s3: S3Server, bucket: str) -> dict[str, str]:
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir(parents=True, exist_ok=True)
    for name in COMFY_FOLDERS:
        (models / name).mkdir(parents=True, exist_ok=True)
    return {**server_env(), **api.env(), **s3.env(bucket),
            "DIFFBOX_COMFYUI_DIR": str(install.comfy_dir), "DIFFBOX_COMFYUI_PYTHON": str(install.python),
            "DIFFBOX_COMFYUI_PORT": str(port), "DIFFBOX_COMFYUI_ARGS": shlex.join(server_args(base)),
            "DIFFBOX_MODELS_DIR": str(models), "DIFFBOX_WORK_DIR": str(base / "work"),
            "DIFFBOX_PREFETCH": prefetch, "DIFFBOX_LOG_LEVEL": "DEBUG", "DIFFBOX_LOG_FORMAT": "json"}


def ready_after(url: str, t0: float, stop: threading.Event, into: dict[str, float]) -> None:
    while not stop.is_set():
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/system_stats", timeout=1).status_code == 200:
                into["comfyui_ready_s"] = round(time.time() - t0, 2)
                return
        time.sleep(0.05)


def wait_final(api: FakeRunpodApi, job_id: str, worker: subprocess.Popen[bytes]) -> dict[str, Any]:
    while (final := api.final(job_id)) is None:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode} before {job_id} ended")
        time.sleep(0.02)
    output = final.get("output")
    if not isinstance(output, dict) or "outputs" not in output:
        raise SystemExit(f"{job_id} failed: {str(final)[:2000]}")
    return output


def run(install: Install, models: Path, join: Callable[[], None], work: Path,
        prefetch: str, s3: S3Server, bucket: str) -> dict[str, Any]:
    port, api = free_port(), FakeRunpodApi().start()
    env = worker_env(install, work, models, port, prefetch, api, s3, bucket)
    api.add_job("first", job(1, "a lighthouse at dusk, waves", "blurry, static"))
    figures: dict[str, Any] = {"prefetch": prefetch}
    drop_page_cache()
    stop = threading.Event()
    t0 = time.time()
    try:
        with production_worker(env, work / "worker.log", preexec_fn=join) as worker:
            threading.Thread(target=ready_after, args=(f"http://127.0.0.1:{port}", t0, stop, figures),
                             daemon=True).start()
            first = wait_final(api, "first", worker)
            figures["first_job_s"] = round(time.time() - t0, 2)
            api.add_job("second", job(2, "a red kite over a field", "dark, still"))
            t1 = time.time()
            second = wait_final(api, "second", worker)
            figures["warm_job_s"] = round(time.time() - t1, 2)
    finally:
        stop.set()
        api.close()
    events = [json.loads(line) for line in (work / "worker.log").read_text().splitlines() if line.startswith("{")]
    figures["worker_ready_s"] = next(round(e["ts"] - t0, 2) for e in events
                                     if e["msg"] == "start phase done" and e.get("phase") == "start")
    ended = [e for e in events if e["msg"] == "prefetch ended"]
    if ended:
        figures["prefetch_read"] = {k: ended[0][k] for k in ("read_mb", "cached_mb", "seconds", "read_mb_per_s",
                                                                 "ended")}
    node_times = [e["nodes"] for e in events if e["msg"] == "prompt node times"]
    figures["first"] = breakdown(node_times[0], first, models)
    figures["warm"] = breakdown(node_times[1], second, models)
    return figures


def breakdown(nodes: list[dict[str, Any]], result: dict[str, Any], models: Path) -> dict[str, Any]:
    """Seconds by stage of one job from its prompt's node times; each loader with its file."""
    sizes = {path.name: path.stat().st_size for path in models.glob("*/*") if path.is_file()}
    loads, stages = [], dict.fromkeys(STAGES, 0.0)
    for node in nodes:
        if "file" in node:
            size = sizes.get(node["file"], 0)
            loads.append({"node": node["class"], "file": node["file"], "mb": round(size / MB), "seconds": node["s"],
                          "mb_per_s": round(size / MB / node["s"]) if node["s"] else None})
        for stage, classes in STAGES.items():
            if node["class"] in classes:
                stages[stage] = round(stages[stage] + node["s"], 2)
    timings = result.get("timings", {})
    work = sum(node["s"] for node in nodes if "file" not in node)
    return {"loads": loads, **stages, "work_s": round(work, 2), "upload_s": timings.get("upload_s"), "comfyui_exec_s":
            timings.get("comfyui_exec_s"), "job_total_s": timings.get("total_s")}


def show(figures: dict[str, Any], rate_mb: float | None, total_mb: float) -> None:
    where = f"volume read at {rate_mb:g} MB/s" if rate_mb else "local disk"
    print(f"\n== prefetch {figures['prefetch']}, {where}")
    print(f"worker ready for jobs        {figures['worker_ready_s']:8.2f} s after its start")
    print(f"ComfyUI answering            {figures['comfyui_ready_s']:8.2f} s")
    if "prefetch_read" in figures:
        p = figures["prefetch_read"]
        print(f"prefetch                     {p['seconds']:8.2f} s  read {p['read_mb']} MB "
              f"({p['read_mb_per_s']} MB/s), found cached {p['cached_mb']} MB, ended: {p['ended']}")
    for name in ("first", "warm"):
        part = figures[name]
        print(f"-- {name} job")
        for load in part["loads"]:
            rate = load["mb_per_s"] or "-"
            print(f"   load {load['file']:<58} {load['mb']:6} MB {load['seconds']:7.2f} s {rate:>6} MB/s")
        print("   " + ", ".join(f"{stage} {part[stage]:.2f} s" for stage in STAGES)
              + f", upload {part['upload_s']} s, in ComfyUI {part['comfyui_exec_s']} s")
    print(f"first job, from the worker's start  {figures['first_job_s']:8.2f} s")
    print(f"warm job                            {figures['warm_job_s']:8.2f} s")
    # What the first job waited for (ComfyUI's start, the loads), apart from its work, whose
    # time on a CPU varies from run to run by more than the loads take.
    waited = figures["first_job_s"] - figures["first"]["work_s"]
    figures["first_waited_s"] = round(waited, 2)
    print(f"first job less its nodes' work      {waited:8.2f} s (ComfyUI's start and the loads; "
          f"its work {figures['first']['work_s']:.2f} s, the warm job's {figures['warm']['work_s']:.2f} s)")
    if rate_mb:
        figures["read_s"] = round(total_mb / rate_mb, 2)
        print(f"floor: max(ComfyUI start, {total_mb:.0f} MB at {rate_mb:g} MB/s) = "
              f"{max(figures['comfyui_ready_s'], figures['read_s']):.2f} s")
        goal = max(figures["comfyui_ready_s"], total_mb / rate_mb) + figures["warm_job_s"]
        figures["goal_s"] = round(goal, 2)
        print(f"goal: max(ComfyUI start, {total_mb:.0f} MB at {rate_mb:g} MB/s) + warm job = {goal:.2f} s; "
              f"first job is {figures['first_job_s'] / goal:.2f} x that")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mb", type=float, help="the volume's read rate in MB/s (default: this machine's disk)")
    parser.add_argument("--prefetch", choices=("off", "on", "both"), default="both")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--logs", type=Path, help="keep each run's worker log (JSON lines) in this folder")
    args = parser.parse_args()
    # Stopped, it still unmounts the volume and stops the worker (the `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        raise SystemExit("cold_start.py drops the page cache before each run: run it as root")
    install = installed()
    modes = {"off": ["off"], "on": ["i2v:fast"], "both": ["off", "i2v:fast"]}[args.prefetch]
    total_mb = sum(f.local_path(install.typed_models).stat().st_size
                   for f in manifest.load().required("i2v", "fast")) / MB
    results = []
    with tempfile.TemporaryDirectory(prefix="diffbox-cold-") as tmp, start_moto(Path(tmp) / "moto.log") as s3:
        bucket = s3.new_bucket()
        with models_dir(args, Path(tmp), install) as (models, join):
            for i, prefetch in enumerate(modes):
                figures = run(install, models, join, Path(tmp) / f"run-{i}", prefetch, s3, bucket)
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(Path(tmp) / f"run-{i}" / "worker.log", args.logs / f"worker-prefetch-{prefetch}.log")
                show(figures, args.rate_mb, total_mb)
                results.append(figures)
    if args.json:
        args.json.write_text(json.dumps({"rate_mb": args.rate_mb, "total_mb": round(total_mb), "runs": results},
                                        indent=2))


if __name__ == "__main__":
    main()
