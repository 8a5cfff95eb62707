"""A job's LoRAs: each from the cache when it holds that version of the source, else
downloaded, checked and added; all pinned until the job ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import logs
from ..config import Settings
from ..errors import JobError, validation
from ..inputs import urls
from ..inputs.urls import Transfer, Validators
from ..storage.outputs import sha256_file
from ..storage.s3 import S3Store
from .cache import LoraCache, Pin
from .header import NotALora, check_lora
from .request import HfSource, HttpsSource, LoraEntry, Source
from .sources import Bucket, Download, Hub, Limits, Web

log = logs.get("loras")
# (bytes of the current file so far, its size when known)
OnBytes = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class Fetched:
    source: str  # as results and records show it (no query string)
    sha256: str
    bytes: int
    cache_hit: bool
    comfy_name: str

    def describe(self, entry: LoraEntry) -> dict[str, Any]:
        described = {"source": self.source, "sha256": self.sha256, "bytes": self.bytes, "cache_hit": self.cache_hit,
                     "strength": entry.strength}
        if entry.target is not None:
            described["target"] = entry.target
        return described


@dataclass
class LoraFetcher:
    cache: LoraCache
    hub: Hub
    web: Web
    bucket: Bucket
    max_bytes: int

    def fetch(self, entries: list[LoraEntry], on_bytes: OnBytes, cancelled: Callable[[], bool],
              time_left_s: Callable[[], float]) -> JobLoras:
        """Every entry's file in the cache, pinned; a validation error names the entry that failed."""
        job = JobLoras()
        try:
            for i, entry in enumerate(entries):
                job.files.append(self._one(i, entry, job, on_bytes, cancelled, time_left_s))
        except BaseException:
            job.release()
            raise
        if any(not f.cache_hit for f in job.files):
            self.cache.evict()
        return job

    def _one(self, i: int, entry: LoraEntry, job: JobLoras, on_bytes: OnBytes, cancelled: Callable[[], bool],
             time_left_s: Callable[[], float]) -> Fetched:
        name = f"loras[{i}].source"
        source = entry.parsed
        described = source.describe()
        # A caller who names the bytes needs no request at all when the cache holds them.
        if entry.sha256 is not None and (pin := self.cache.pin(entry.sha256)) is not None:
            return self._hit(pin, described, job)
        way = self._way(source, name, entry.sha256, job, cancelled, time_left_s)
        if isinstance(way, Fetched):
            return way
        def stopped() -> None:
            """Raise when the job is cancelled or out of time (checked while waiting and downloading)."""
            if cancelled():
                raise JobError("cancelled", "job cancelled")
            if time_left_s() <= 0:
                raise JobError("timeout", f"{name}: the job ran out of time (DIFFBOX_JOB_TIMEOUT_S) fetching it")

        with self.cache.source_lock(way.keys[-1], stopped):
            # Another worker may have fetched it while this one waited for the lock.
            record = self.cache.lookup(way.keys[-1])
            held = self.cache.pin(record["sha256"]) if record is not None else None
            if held is not None:
                job.pins.append(held)  # released with the job's, whatever happens next
                if not way.revalidate:
                    return self._cached(held.sha256, described)
            unless = Validators(record.get("etag"), record.get("last_modified")) if held and record else None
            t0 = time.monotonic()
            temp = self.cache.temp_path(way.keys[-1])
            try:
                with Download(temp, Limits(self.max_bytes, name), on_bytes, stopped) as into:
                    transfer = way.download(into, unless if unless and unless.headers() else None)
                if transfer is not None and transfer.not_modified and held is not None:
                    return self._cached(held.sha256, described)
                try:
                    check_lora(temp)
                except NotALora as exc:
                    raise validation(f"{name}: {exc}") from None
                sha256 = sha256_file(temp)
                if way.expected is not None and sha256 != way.expected:
                    raise validation(f"{name}: the file's sha256 is {sha256}, not the expected {way.expected}")
                size = temp.stat().st_size
                job.pins.append(self.cache.add(temp, sha256, described))
            finally:
                temp.unlink(missing_ok=True)
            validators = transfer.validators if transfer is not None else Validators()
            for key in way.keys:
                self.cache.remember(key, sha256, etag=validators.etag, last_modified=validators.last_modified)
        logs.event(log, "lora downloaded", index=i, sha256=sha256, bytes=size, elapsed_s=logs.since(t0))
        return Fetched(described, sha256, size, False, self.cache.comfy_name(sha256))

    def _way(self, source: Source, name: str, expected: str | None, job: JobLoras, cancelled: Callable[[], bool],
             time_left_s: Callable[[], float]) -> _Way | Fetched:
        """How to fetch `source`, or the cached file when naming its version already found it."""
        if isinstance(source, HfSource):
            keys = []
            if source.pinned:
                keys.append(Hub.pinned_key(source))
                record = self.cache.lookup(keys[0])
                if record is not None and (pin := self.cache.pin(record["sha256"])) is not None:
                    return self._hit(pin, source.describe(), job)
            version = self.hub.version(source, name)
            if version.sha256 is not None:
                if expected is not None and version.sha256 != expected:
                    raise validation(f"{name}: the Hub's file has sha256 {version.sha256}, not the expected {expected}")
                if (pin := self.cache.pin(version.sha256)) is not None:
                    self.cache.remember(version.key, version.sha256)
                    return self._hit(pin, source.describe(), job)
            return _Way([*keys, version.key], lambda into, unless: self.hub.fetch(source, version, into, name),
                        expected or version.sha256)
        if isinstance(source, HttpsSource):
            # A URL names no version: a cached copy is re-validated with a conditional request.
            return _Way([Web.key(source)], lambda into, unless: self.web.fetch(
                source, into, name, cancelled, time_left_s(), unless), expected, revalidate=True)
        key = self.bucket.version(source, name)[0]
        return _Way([key], lambda into, unless: self.bucket.fetch(source, into, name), expected)

    def _hit(self, pin: Pin, described: str, job: JobLoras) -> Fetched:
        job.pins.append(pin)
        return self._cached(pin.sha256, described)

    def _cached(self, sha256: str, described: str) -> Fetched:
        return Fetched(described, sha256, self.cache.path(sha256).stat().st_size, True, self.cache.comfy_name(sha256))


@dataclass(frozen=True)
class _Way:
    """How to fetch one source: the index keys naming this version of it (the last one is
    locked while fetching), the download, and the sha256 the file must have if known."""

    keys: list[str]
    download: Callable[[Download, Validators | None], Transfer | None]
    expected: str | None
    revalidate: bool = False  # the key names no version: a cached copy must be re-validated


@dataclass
class JobLoras:
    files: list[Fetched] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)

    def release(self) -> None:
        for pin in self.pins:
            pin.release()
        self.pins.clear()


def fetcher_for(settings: Settings, url_policy: urls.UrlPolicy, s3: S3Store | None) -> LoraFetcher:
    cache = LoraCache(settings.models_dir / "loras", int(settings.lora_cache_gb * 1e9))
    return LoraFetcher(cache, Hub(settings.hf_endpoint.rstrip("/"), settings.hf_token),
                       Web(url_policy, settings.civitai_token), Bucket(s3), int(settings.max_lora_mb * 1e6))
