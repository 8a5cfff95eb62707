"""Output upload to S3: throughput, and the worker's peak memory whatever the file size.

    uv run python bench/storage.py                     # a 1 GB output, 16 MB parts, 4 at a time
    uv run python bench/storage.py --size-mb 4096 --part-size-mb 8 --concurrency 8

The output goes the way a job's does (`OutputUploads` -> `S3Store`: described, hashed, then
uploaded from disk in multipart parts) to moto's S3 server on loopback. moto keeps every
object in memory, so it runs in its own process and only this one's memory is measured:
peak RSS (getrusage) above the RSS just before the upload. Target: under 150 MB above idle.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MB = 1024 * 1024
TARGET_MB = 150


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_file(path: Path, size: int) -> str:
    """`size` bytes that do not compress, written 1 MiB at a time; their sha256."""
    block = os.urandom(MB)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for offset in range(0, size, MB):
            chunk = block[: min(MB, size - offset)]
            # Each block differs, so no layer below can deduplicate the parts.
            chunk = offset.to_bytes(8, "little") + chunk[8:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--part-size-mb", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from diffbox.config import S3Settings
    from diffbox.storage.s3 import S3Store
    from diffbox.storage.stores import OutputUploads
    from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, start_moto

    with tempfile.TemporaryDirectory(prefix="diffbox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "output.mp4"
        sha256 = write_file(path, args.size_mb * MB)
        with start_moto(tmp / "moto.log") as server:
            bucket = server.new_bucket()
            store = S3Store(S3Settings(
                bucket=bucket, endpoint_url=server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                secret_access_key=SECRET_KEY, part_size_mb=args.part_size_mb, max_concurrency=args.concurrency,
            ))
            idle = current_rss_mb()
            t0 = time.perf_counter()
            uploads = OutputUploads(store)
            uploads.add(f"bench/{path.name}", lambda: path, False, {})
            (result,) = uploads.results()
            uploads.close()
            elapsed = time.perf_counter() - t0
            peak = peak_rss_mb()
            head = server.client().head_object(Bucket=bucket, Key=f"bench/{path.name}")
        assert result["sha256"] == sha256 and head["ContentLength"] == args.size_mb * MB
        parts = head["ETag"].strip('"').partition("-")[2] or "1"
    above = peak - idle
    print(f"file:        {args.size_mb} MB in {parts} parts of {args.part_size_mb} MB, {args.concurrency} at a time")
    print(f"time:        {elapsed:.1f} s (describe + sha256 + upload), {args.size_mb / elapsed:.0f} MB/s")
    print(f"worker RSS:  idle {idle:.0f} MB, peak {peak:.0f} MB, peak above idle {above:.0f} MB")
    print(f"target:      under {TARGET_MB} MB above idle: {'met' if above < TARGET_MB else 'MISSED'}")
    if above >= TARGET_MB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
