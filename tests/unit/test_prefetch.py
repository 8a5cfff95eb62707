"""Prefetching weights into the page cache at cold start (diffbox/prefetch.py, pagecache.py):
what is read, in which order, and where it stops. The page cache here is the machine's own:
files are evicted with posix_fadvise before each test and looked at with mincore."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from diffbox import pagecache, prefetch
from diffbox.config import Settings
from diffbox.service import Service
from diffbox.workflows import manifest

# Larger than the kernel's readahead, which caches some of the next chunk as a chunk is read.
CHUNK = 256 * mmap.PAGESIZE


def evicted(path: Path, size: int) -> Path:
    """A file of `size` random bytes, none of it in the page cache."""
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def cached(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.cached_bytes(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def none_cached(paths: list[Path]) -> list[Path]:
    if any(cached(path) for path in paths):
        pytest.skip("this file system keeps written files in the cache whatever posix_fadvise says")
    return paths


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return none_cached([evicted(tmp_path / f"w{i}.safetensors", 3 * CHUNK + 123 * i) for i in range(3)])


def run(files: list[Path], free: Callable[[], int | None] = lambda: None, threads: int = 3,
        reserve: int = 0) -> prefetch.Report:
    report = prefetch.Prefetch(files, threads, reserve, free=free, chunk_bytes=CHUNK).start().wait(30)
    assert report is not None
    return report


def test_every_file_ends_up_cached(files: list[Path]) -> None:
    report = run(files)
    total = sum(path.stat().st_size for path in files)
    assert (report.ended, report.files, report.total_bytes) == ("done", 3, total)
    # The kernel's readahead may cache a chunk before a reader gets to it: found, not read.
    assert report.read_bytes + report.cached_bytes == total and report.read_bytes > 0
    assert [cached(path) for path in files] == [path.stat().st_size for path in files]


def test_what_is_cached_already_is_not_read_again(files: list[Path]) -> None:
    files[0].read_bytes()
    report = run(files)
    assert report.cached_bytes >= files[0].stat().st_size
    assert report.read_bytes <= sum(path.stat().st_size for path in files[1:])
    assert [cached(path) for path in files] == [path.stat().st_size for path in files]


def test_one_reader_completes_the_first_file_before_the_next(files: list[Path]) -> None:
    seen: list[list[int]] = []

    def free() -> None:  # asked before each chunk is read: what is cached by then
        seen.append([cached(path) for path in files])

    run(files, free, threads=1)
    first_of_second = next(i for i, state in enumerate(seen) if state[1] or state[2])
    assert seen[first_of_second][0] == files[0].stat().st_size


def test_it_stops_where_free_memory_ends(files: list[Path]) -> None:
    lock, budget = threading.Lock(), [3 * CHUNK]

    def free() -> int:  # the memory the prefetch's own reads take
        with lock:
            left = budget[0]
            budget[0] -= CHUNK
            return left

    report = run(files, free, threads=1, reserve=CHUNK)
    assert report.ended == "memory"
    assert report.read_bytes == 2 * CHUNK
    # The kernel's readahead may add a window (a chunk or so) beyond what the prefetch read.
    assert 2 * CHUNK <= sum(cached(path) for path in files) <= 4 * CHUNK


def test_stop_ends_the_reads(files: list[Path]) -> None:
    gate = threading.Event()
    job = prefetch.Prefetch(files, 1, 0, free=lambda: gate.wait(10) and None, chunk_bytes=CHUNK).start()
    job.stop()
    gate.set()
    report = job.wait(30)
    assert report is not None and report.ended == "stopped"
    assert report.read_bytes <= CHUNK


def test_free_memory_is_the_smaller_of_the_machine_and_the_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:        10000000 kB\nMemAvailable: 20000000 kB\n")
    v2 = tmp_path / "v2"
    (v2 / "worker").mkdir(parents=True)
    (v2 / "worker" / "memory.max").write_text("8000000000\n")
    (v2 / "worker" / "memory.current").write_text("3000000000\n")
    (tmp_path / "cgroup-v2").write_text("0::/worker\n")
    assert pagecache.free_bytes(meminfo, v2, tmp_path / "cgroup-v2") == 5_000_000_000
    (v2 / "worker" / "memory.max").write_text("max\n")
    assert pagecache.free_bytes(meminfo, v2, tmp_path / "cgroup-v2") == 10_000_000 * 1024
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "c1").mkdir(parents=True)
    (v1 / "memory" / "docker" / "c1" / "memory.limit_in_bytes").write_text("4000000000\n")
    (v1 / "memory" / "docker" / "c1" / "memory.usage_in_bytes").write_text("1000000000\n")
    (tmp_path / "cgroup-v1").write_text("5:cpuset:/\n4:memory:/docker/c1\n0::/\n")
    assert pagecache.free_bytes(meminfo, v1, tmp_path / "cgroup-v1") == 3_000_000_000
    assert pagecache.free_bytes(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def i2v_fast_on_disk(models_dir: Path) -> list[Path]:
    paths = [model.local_path(models_dir) for model in manifest.load().required("i2v", "fast")]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        evicted(path, CHUNK)
    return paths


def test_entries_name_the_manifest_files_on_disk_in_its_order(tmp_path: Path) -> None:
    paths = i2v_fast_on_disk(tmp_path)
    paths[-1].unlink()  # a missing file is the job's error to report, not the prefetch's
    settings = Settings(comfyui_url="http://127.0.0.1:9", models_dir=tmp_path, warmup=["i2v:fast"])
    assert prefetch.files_for(settings.prefetch_entries(), settings) == paths[:-1]
    assert prefetch.files_for(["nope", "chat", "i2v", "i2v:fast"], settings) == paths[:-1]
    not_served = settings.model_copy(update={"workflows": ["qwen_edit"]})
    assert prefetch.files_for(["i2v"], not_served) == []


@pytest.mark.parametrize(("variable", "entries"), [
    (None, ["i2v:fast"]), ("off", []), ("OFF", []), ("svi:quality,i2v", ["svi:quality", "i2v"]),
])
def test_the_setting_defaults_to_the_warm_up(variable: str | None, entries: list[str]) -> None:
    env = {"DIFFBOX_COMFYUI_URL": "http://127.0.0.1:9", "DIFFBOX_WARMUP": "i2v:fast"}
    if variable is not None:
        env["DIFFBOX_PREFETCH"] = variable
    assert Settings.from_env(env).prefetch_entries() == entries


def test_the_service_prefetches_the_files_of_its_entries(tmp_path: Path) -> None:
    paths = none_cached(i2v_fast_on_disk(tmp_path / "models"))
    # No reserve: this machine's free memory (a busy one's page cache fills it) is not what is tested.
    service = Service(Settings(comfyui_url="http://127.0.0.1:9", models_dir=tmp_path / "models",
                               work_dir=tmp_path / "work", prefetch=["i2v:fast"], prefetch_reserve_gb=0))
    service.start_prefetch()
    assert service._prefetch is not None
    report = service._prefetch.wait(30)
    assert report is not None and report.ended == "done"
    assert [cached(path) for path in paths] == [CHUNK] * len(paths)
    service.stop()


def test_after_a_gpu_snapshot_the_warm_up_weights_are_not_read(tmp_path: Path) -> None:
    """A GPU snapshot is taken after the warm-up: its weights come back loaded, in VRAM."""
    i2v_fast_on_disk(tmp_path / "models")
    settings = Settings(comfyui_url="http://127.0.0.1:9", models_dir=tmp_path / "models", work_dir=tmp_path / "w",
                        warmup=["i2v:fast"])
    service = Service(settings)
    service.start_prefetch(warmed=True)
    assert service._prefetch is None
    service = Service(settings.model_copy(update={"prefetch": ["i2v:fast", "i2v:quality"]}))
    service.start_prefetch(warmed=True)
    assert service._prefetch is not None and service._prefetch.wait(30) is not None
    assert service._prefetch.files == prefetch.files_for(["i2v:quality"], settings)

