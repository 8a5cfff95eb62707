"""Fetching one LoRA source into a file, each kind by its own library and rules.

- hf://: huggingface_hub, against HF_ENDPOINT; HF_TOKEN goes to the Hub only, never to the
  CDN host a large file is served from. The Hub's ETag of an LFS file is its sha256: it
  names the cache entry before a byte is downloaded.
- https://: the URL guard (diffbox.inputs.urls: https only, public addresses only, every redirect
  re-checked); CIVITAI_TOKEN goes to civitai.com hosts only, decided again on every hop.
- s3://: this endpoint's bucket, through its S3 client; the ETag names the version.
Every fetch streams into a `Download`, which bounds the size while the bytes arrive.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils.tqdm import silent_tqdm

from ..errors import JobError, validation
from ..inputs import urls
from ..storage.s3 import S3Store
from .request import HfSource, HttpsSource, S3Source

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# huggingface_hub warns on each retry with the URL it was reading: for a large file, a signed CDN
# URL (a credential while it lasts). Its errors still reach the caller, as validation errors.
logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
CIVITAI = "civitai.com"


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    field: str

    def too_large(self) -> JobError:
        return validation(f"{self.field}: the file is larger than the {self.max_bytes / 1e6:g} MB limit "
                          "(DIFFBOX_MAX_LORA_MB)")


class Download:
    """The file a fetch writes: bounded in size, cancellable, reporting bytes as they arrive."""

    def __init__(self, path: Path, limits: Limits, on_bytes: Callable[[int, int | None], None],
                 stopped: Callable[[], None]) -> None:
        self.path = path
        self.limits = limits
        self.total: int | None = None
        self.size = 0
        self._on_bytes = on_bytes
        self._stopped = stopped
        self._file = path.open("wb")

    def expect(self, total: int | None) -> None:
        if total is not None and total > self.limits.max_bytes:
            raise self.limits.too_large()
        self.total = total

    def write(self, chunk: bytes) -> int:
        self._stopped()
        self.size += len(chunk)
        if self.size > self.limits.max_bytes:
            raise self.limits.too_large()
        self._file.write(chunk)
        self._on_bytes(self.size, self.total)
        return len(chunk)

    # huggingface_hub rewinds a resumed download whose server ignored the Range header.
    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        result = self._file.seek(offset, whence)
        self.size = self._file.tell()
        return result

    def truncate(self, size: int | None = None) -> int:
        return self._file.truncate(size)

    def __enter__(self) -> Download:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._file.close()
        if exc is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class HfVersion:
    """What the Hub says of a file at a revision, before any byte of it is fetched."""

    key: str  # repo@commit/path: the version's name in the cache index
    sha256: str | None  # an LFS file's, from its ETag
    size: int | None
    location: str


@dataclass(frozen=True)
class Hub:
    endpoint: str
    token: str | None

    def version(self, source: HfSource, field: str) -> HfVersion:
        url = hf_hub_url(source.repo, source.path, revision=source.revision, endpoint=self.endpoint)
        with _HubErrors(source, field):
            # No retries (huggingface_hub's own default): a job fails in seconds, not half a minute.
            meta = get_hf_file_metadata(url, token=self.token or False, endpoint=self.endpoint)
        etag = meta.etag or ""
        commit = meta.commit_hash or source.revision or "main"
        return HfVersion(f"hf:{source.repo}@{commit}/{source.path}", etag if SHA256.match(etag) else None,
                         meta.size, meta.location)

    def fetch(self, source: HfSource, version: HfVersion, into: Download, field: str) -> None:
        into.expect(version.size)
        headers = build_hf_headers(token=self.token or False)
        if urlsplit(version.location).netloc != urlsplit(self.endpoint).netloc:
            headers.pop("authorization", None)  # the Hub's token is not for its CDN
        with _HubErrors(source, field):
            http_get(version.location, into, headers=headers, expected_size=version.size, tqdm_class=silent_tqdm)  # type: ignore[arg-type]

    @staticmethod
    def pinned_key(source: HfSource) -> str:
        return f"hf:{source.repo}@{source.revision}/{source.path}"


@dataclass(frozen=True)
class _HubErrors:
    source: HfSource
    field: str

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            reason = {401: "unauthorised (gated or private: set HF_TOKEN)", 403: "forbidden (gated: set HF_TOKEN)",
                      404: "not found (repo, revision or file)"}.get(status or 0, f"HTTP {status}")
            raise validation(f"{self.field}: {self.source.describe()}: {reason}") from None
        # Connection failures (httpx2's, after huggingface_hub's retries), and http_get's size check.
        if isinstance(exc, OSError | httpx2.HTTPError):
            raise validation(f"{self.field}: could not fetch {self.source.describe()} from the Hub: "
                             f"{type(exc).__name__}") from None


@dataclass(frozen=True)
class Web:
    policy: urls.UrlPolicy
    civitai_token: str | None

    def fetch(self, source: HttpsSource, into: Download, field: str, cancelled: Callable[[], bool],
              time_left_s: float, unless: urls.Validators | None) -> urls.Transfer:
        # A LoRA is far larger than an input image: the whole fetch may take what the job has left.
        policy = replace(self.policy, total_timeout_s=max(time_left_s, 1.0))
        return urls.stream(source.url, field, urls.Bounds(into.limits.max_bytes, into.limits.too_large()), policy,
                           into.write, cancelled, self._headers, into.expect, unless)

    def _headers(self, host: str) -> dict[str, str]:
        host = host.lower()
        if self.civitai_token and (host == CIVITAI or host.endswith("." + CIVITAI)):
            return {"Authorization": f"Bearer {self.civitai_token}"}
        return {}

    @staticmethod
    def key(source: HttpsSource) -> str:
        return f"https:{source.url}"


@dataclass(frozen=True)
class Bucket:
    store: S3Store | None

    def version(self, source: S3Source, field: str) -> tuple[str, int]:
        """(the key naming this version of the object, its size)."""
        etag, size = self._store(field).head(source.describe(), field)
        return f"s3:{source.bucket}/{source.key}#{etag}", size

    def fetch(self, source: S3Source, into: Download, field: str) -> None:
        self._store(field).stream(source.describe(), field, into.limits.max_bytes, into.limits.too_large(),
                                  into.write)

    def _store(self, field: str) -> S3Store:
        if self.store is None:
            raise validation(f"{field}: s3:// sources need S3 storage, which this endpoint does not configure")
        return self.store
