"""What it would cost a worker to hash its weights before every job, against what it does
(compare sizes with the weights lock).

    uv run python bench/weights_check.py                       # sha256 rate in memory
    uv run python bench/weights_check.py --file /models/diffusion_models/NAME.safetensors

Prints the sha256 rate (in memory: the CPU's bound; with --file: the disk's and CPU's
together, the first read of a network volume being slower than a cached one), the time that
rate gives for each workflow and preset's files (the manifest's estimated sizes), and the
time of the check the worker makes, on files of those sizes in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from builder.weights import sha256_file
from diffbox import model_lock
from diffbox.workflows import manifest

_BLOCK = 16 << 20


def memory_rate(total: int = 1 << 30) -> float:
    block = os.urandom(_BLOCK)
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(total // _BLOCK):
        digest.update(block)
    return total / (time.perf_counter() - t0)


def file_rate(path: Path) -> float:
    t0 = time.perf_counter()
    sha256_file(path)
    return path.stat().st_size / (time.perf_counter() - t0)


def size_check_seconds(model_set: str, preset: str, runs: int = 200) -> float:
    """The worker's own check, on sparse files of the manifest's sizes and a lock for them."""
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        locked = {}
        for f in manifest.load().required(model_set, preset):
            path = f.local_path(models)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as out:
                out.truncate(f.size)  # sparse: takes no disk
            locked[f.key] = model_lock.LockedFile(repo=f.repo, path=f.path, folder=f.folder, revision=f.revision,
                                                  commit="0" * 40, size=f.size, sha256="0" * 64,
                                                  fetched_at=model_lock.now())
        model_lock.write(models / model_lock.LOCK_NAME, model_lock.WeightsLock(files=locked))
        t0 = time.perf_counter()
        for _ in range(runs):
            manifest.check_on_disk(model_set, preset, models)
        return (time.perf_counter() - t0) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="hash this file instead of memory")
    args = parser.parse_args()
    rate = file_rate(args.file) if args.file else memory_rate()
    print(f"sha256: {rate / 2**20:.0f} MiB/s ({'file ' + str(args.file) if args.file else 'in memory'})")
    print(f"{'model set':16} {'preset':8} {'bytes (estimate)':>17} {'hash all, s':>12} {'size check, ms':>15}")
    for model_set, presets in manifest.load().workflows.items():
        for preset in presets:
            total = sum(f.size for f in manifest.load().required(model_set, preset))
            check_ms = size_check_seconds(model_set, preset) * 1000
            print(f"{model_set:16} {preset:8} {total:>17} {total / rate:>12.0f} {check_ms:>15.2f}")


if __name__ == "__main__":
    main()
