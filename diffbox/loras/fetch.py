"""A job's LoRAs: each from the cache when it holds that version of the source, else
downloaded, checked and added; all pinned until the job ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import logs, urls
from ..config import Settings
from ..errors import validation
from ..outputs import sha256_file
from ..s3 import S3Store
from .cache import LoraCache, Pin
from .header import NotALora, check_lora
from .request import HfSource, HttpsSource, LoraEntry
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
        expected: str | None = None
        keys: list[str] = []
        download: Callable[[Download], None]
        if isinstance(source, HfSource):
            if source.pinned:
                keys.append(Hub.pinned_key(source))
                if (hit := self._hit(keys[0], source.describe(), job)) is not None:
                    return hit
            version = self.hub.version(source, name)
            if version.sha256 is not None and (hit := self._pinned(version.sha256, source.describe(), job)):
                self.cache.remember(version.key, version.sha256)
                return hit
            keys.append(version.key)
            expected = version.sha256

            def download(into: Download) -> None:
                self.hub.fetch(source, version, into, name)
        elif isinstance(source, HttpsSource):
            keys.append(Web.key(source))

            def download(into: Download) -> None:
                self.web.fetch(source, into, name, cancelled, time_left_s())
        else:
            keys.append(self.bucket.version(source, name)[0])

            def download(into: Download) -> None:
                self.bucket.fetch(source, into, name)

        with self.cache.source_lock(keys[-1]):
            # Another worker may have fetched it while this one waited for the lock.
            if (hit := self._hit(keys[-1], source.describe(), job)) is not None:
                return hit
            t0 = time.monotonic()
            temp = self.cache.temp_path(keys[-1])
            try:
                with Download(temp, Limits(self.max_bytes, name), on_bytes, cancelled) as into:
                    download(into)
                try:
                    check_lora(temp)
                except NotALora as exc:
                    raise validation(f"{name}: {exc}") from None
                sha256 = sha256_file(temp)
                if expected is not None and sha256 != expected:
                    raise validation(f"{name}: the download's sha256 {sha256} is not the announced {expected}")
                size = temp.stat().st_size
                job.pins.append(self.cache.add(temp, sha256, source.describe()))
            finally:
                temp.unlink(missing_ok=True)
            for key in keys:
                self.cache.remember(key, sha256)
        logs.event(log, "lora downloaded", index=i, sha256=sha256, bytes=size, elapsed_s=logs.since(t0))
        return Fetched(source.describe(), sha256, size, False, self.cache.comfy_name(sha256))

    def _hit(self, key: str, described: str, job: JobLoras) -> Fetched | None:
        sha256 = self.cache.lookup(key)
        return self._pinned(sha256, described, job) if sha256 is not None else None

    def _pinned(self, sha256: str, described: str, job: JobLoras) -> Fetched | None:
        pin = self.cache.pin(sha256)
        if pin is None:
            return None
        job.pins.append(pin)
        size = self.cache.path(sha256).stat().st_size
        return Fetched(described, sha256, size, True, self.cache.comfy_name(sha256))


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
                       Web(url_policy, settings.civitai_token), Bucket(s3), int(settings.max_lora_mb * 2**20))
