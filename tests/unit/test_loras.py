"""LoRA entries, the safetensors check and the cache (diffbox/loras), on real files and processes."""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from diffbox.errors import JobError
from diffbox.loras.cache import LoraCache
from diffbox.loras.header import NotALora, check_lora
from diffbox.loras.request import HfSource, HttpsSource, S3Source, parse_source
from diffbox.workflows import parse
from tests.lorafiles import lora_bytes, pickle_bytes, safetensors_bytes

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(("value", "source"), [
    ("hf://org/repo/loras/x.safetensors", HfSource("org/repo", "loras/x.safetensors", None)),
    (f"hf://org/repo@{COMMIT}/x.safetensors", HfSource("org/repo", "x.safetensors", COMMIT)),
    ("hf://org/repo/x.safetensors@v1.0", HfSource("org/repo", "x.safetensors", "v1.0")),
    ("https://civitai.com/api/download/models/12345", HttpsSource("https://civitai.com/api/download/models/12345")),
    ("s3://bucket/loras/a.safetensors", S3Source("bucket", "loras/a.safetensors")),
])
def test_sources_parse(value: str, source: object) -> None:
    assert parse_source(value) == source


def test_only_a_commit_is_pinned_and_queries_never_show() -> None:
    assert HfSource("o/r", "x.safetensors", COMMIT).pinned
    assert not HfSource("o/r", "x.safetensors", "main").pinned
    assert HttpsSource("https://h.example/a.safetensors?token=secret").describe() == "https://h.example/a.safetensors"


def wan(**lora: Any) -> dict[str, Any]:
    return {"workflow": "i2v", "image": "x", "prompt": "p", "loras": [lora]}


@pytest.mark.parametrize(("payload", "message"), [
    (wan(source="hf://org/repo/x.bin"), "loras.0.source: Value error, expected hf://ORG/REPO/PATH.safetensors"),
    (wan(source="hf://org/repo/../x.safetensors"), "loras.0.source: Value error, expected hf://"),
    (wan(source="file:///etc/passwd"), "loras.0.source: Value error, expected hf://"),
    (wan(source="s3://bucket"), "loras.0.source: Value error, expected s3://BUCKET/KEY"),
    (wan(source="hf://o/r/x.safetensors", strength=4.5), "loras.0.strength: Input should be less than or equal to 4"),
    (wan(source="hf://o/r/x.safetensors", target="middle"), "loras.0.target: Input should be 'high', 'low' or 'both'"),
    ({**wan(source="hf://o/r/x.safetensors"), "loras": [{"source": "hf://o/r/x.safetensors"}] * 5},
     "loras: List should have at most 4 items"),
    ({"workflow": "qwen_edit", "images": ["x"], "prompt": "p",
      "loras": [{"source": "hf://o/r/x.safetensors", "target": "high"}]},
     "loras.0.target: Value error, Qwen Image Edit has one model; target is for Wan's two experts"),
])
def test_bad_entries_are_refused_naming_the_entry(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as err:
        parse(payload)
    assert err.value.type == "validation"
    assert message.replace("Value error, ", "") in err.value.message


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_lora_passes(tmp_path: Path) -> None:
    assert check_lora(write(tmp_path / "a", lora_bytes())) == 3


@pytest.mark.parametrize(("data", "words"), [
    (pickle_bytes(), "not a safetensors file"),
    (b"PK\x03\x04" + b"\0" * 100, "not a safetensors file"),
    (lora_bytes()[:-3], "truncated"),
    (lora_bytes() + b"\0", "header describes"),
    (struct.pack("<Q", 4) + b"[1] ", "not an object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
    (safetensors_bytes({"x.lora_up.weight": ("Q4", [1], b"\0")}), "unknown dtype 'Q4'"),
    (safetensors_bytes({"x.lora_up.weight": ("F32", [2], b"\0" * 4)}), "offsets do not match"),
    (safetensors_bytes({"model.diffusion_model.out.weight": ("F16", [2], b"\0" * 4)}), "looks like a model"),
    (safetensors_bytes({"x.lora_up.weight": ("F16", [1], b"\0\0"), "x.evil": ("F16", [1], b"\0\0")}),
     "tensor 'x.evil' is not one a LoRA loader reads"),
])
def test_anything_else_is_refused(tmp_path: Path, data: bytes, words: str) -> None:
    with pytest.raises(NotALora, match=words):
        check_lora(write(tmp_path / "f", data))


def _race(root: str, key: str, out: str, barrier: Any) -> None:
    """One process of the race: fetch `key` through the cache as the fetcher does."""
    cache = LoraCache(Path(root), 10**9)
    barrier.wait()
    with cache.source_lock(key):
        record = cache.lookup(key)
        if record is None:
            temp = cache.temp_path(key)
            data = lora_bytes(7)
            with temp.open("wb") as f:  # slowly, so the other process surely waits
                for i in range(0, len(data), 16):
                    f.write(data[i:i + 16])
                    time.sleep(0.005)
            sha = hashlib.sha256(data).hexdigest()
            cache.add(temp, sha, "test").release()
            cache.remember(key, sha)
            Path(out).write_text("downloaded")
        else:
            Path(out).write_text("hit")


def test_two_processes_racing_for_one_entry_download_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_race, args=(str(tmp_path), "hf:o/r@c/x.safetensors", str(o), barrier))
             for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(o.read_text() for o in outs) == ["downloaded", "hit"]
    cache_dir = tmp_path / "diffbox-cache"
    assert len(list(cache_dir.glob("*.safetensors"))) == 1
    assert list((cache_dir / ".tmp").iterdir()) == []


def _entry(cache: LoraCache, seed: int, age_s: float) -> str:
    data = lora_bytes(seed, features=64)  # about 2 KB each
    sha = hashlib.sha256(data).hexdigest()
    temp = cache.temp_path(sha)
    temp.write_bytes(data)
    cache.add(temp, sha, f"seed {seed}").release()
    then = time.time() - age_s
    os.utime(cache.path(sha), (then, then))
    return sha


def test_eviction_removes_least_recently_used_first_and_never_a_pinned_entry(tmp_path: Path) -> None:
    size = len(lora_bytes(0, features=64))
    cache = LoraCache(tmp_path, budget_bytes=2 * size)
    oldest, old, new = _entry(cache, 1, 300), _entry(cache, 2, 200), _entry(cache, 3, 100)
    pin = cache.pin(oldest)  # a running job uses the oldest: it is also the most recently used now
    assert pin is not None
    os.utime(cache.path(oldest), (time.time() - 400,) * 2)  # ...and old again, so only the pin protects it
    assert cache.evict() == [old]
    assert {p.name for p in tmp_path.joinpath("diffbox-cache").glob("*.safetensors")} == {
        f"{oldest}.safetensors", f"{new}.safetensors"}
    cache.budget_bytes = 0
    assert cache.evict() == [new]  # over budget, but the pinned entry stays
    assert cache.path(oldest).is_file()
    pin.release()
    assert cache.evict() == [oldest]
    assert not (tmp_path / "diffbox-cache" / f"{oldest}.json").exists()


def test_a_pin_on_an_evicted_entry_is_a_miss(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=0)
    sha = _entry(cache, 1, 10)
    cache.remember("k", sha)
    assert cache.lookup("k") == {"sha256": sha}
    assert cache.evict() == [sha]
    assert cache.lookup("k") is None and cache.pin(sha) is None


def test_an_abandoned_part_goes_but_not_one_being_written(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=10**9)
    abandoned = cache.temp_path("dead")
    abandoned.write_bytes(b"x")
    live = cache.temp_path("live")
    live.write_bytes(b"x")
    with cache.source_lock("live"):
        cache.evict()
        assert live.exists() and not abandoned.exists()


def test_locks_are_flock_per_open_file(tmp_path: Path) -> None:
    # The cache relies on flock's semantics: two opens of one file conflict even in one process.
    cache = LoraCache(tmp_path, 0)
    sha = _entry(cache, 1, 0)
    pin = cache.pin(sha)
    assert pin is not None
    with (tmp_path / "diffbox-cache" / ".locks" / f"{sha}.lock").open("ab") as other, \
            pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pin.release()
