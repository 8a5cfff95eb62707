"""S3-compatible storage through boto3: outputs streamed from disk, presigned URLs, inputs.

One client and one transfer manager per process: every upload of every job shares the
manager's threads, so the memory uploads hold stays about part size x concurrency whatever
the files' sizes and however many jobs run. Transient errors are retried by botocore's own
retry modes; connect and read timeouts are bounded so an unreachable store fails a job in
seconds. Messages and logs name the bucket, endpoint and key, never credentials or URLs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

# boto3 and botocore ship no type hints (boto3-stubs / botocore-stubs are not dependencies).
import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .. import logs
from ..config import S3Settings
from ..errors import JobError, validation
from ..inputs.media import too_large

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logs.get("s3")
MB = 1024 * 1024
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden"}


class S3Store:
    name = "s3"
    streams = True

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.where = f"bucket {settings.bucket!r} at {settings.endpoint_url or 'AWS S3'}"
        config = Config(
            signature_version="s3v4",
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": settings.retry_mode, "max_attempts": settings.max_attempts},
            max_pool_connections=settings.max_concurrency + 4,
            # botocore's default CRC checksums (since 1.36) are refused by several
            # S3-compatible stores (MinIO, Backblaze, GCS); AWS itself does not need them.
            request_checksum_calculation="when_required" if settings.endpoint_url else "when_supported",
            response_checksum_validation="when_required" if settings.endpoint_url else "when_supported",
        )
        # A session of our own: boto3's default session is not safe to share between threads.
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=config,
        )
        part = settings.part_size_mb * MB
        self.transfer = create_transfer_manager(
            self.client,
            TransferConfig(multipart_threshold=settings.multipart_threshold_mb * MB, multipart_chunksize=part,
                           max_concurrency=settings.max_concurrency, use_threads=True),
        )
        logs.event(log, "s3 storage", bucket=settings.bucket, endpoint=settings.endpoint_url,
                   region=settings.region, part_size_mb=settings.part_size_mb,
                   multipart_threshold_mb=settings.multipart_threshold_mb,
                   concurrency=settings.max_concurrency)

    def put(self, path: Path, key: str, content_type: str) -> dict[str, Any]:
        """Upload one file from disk (multipart above the part size); its URL and s3:// URI."""
        t0 = time.monotonic()
        size = path.stat().st_size
        try:
            future = self.transfer.upload(str(path), self.bucket, key, extra_args={"ContentType": content_type})
            future.result()
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.settings.url_ttl_s
            )
        except (BotoCoreError, ClientError) as exc:
            logs.event(log, "upload failed", level=40, bucket=self.bucket, key=key, bytes=size,
                       error=_reason(exc), elapsed_s=logs.since(t0))
            raise JobError("storage", f"could not upload {path.name} to {self.where}: {_reason(exc)}",
                           {"bucket": self.bucket, "endpoint": self.settings.endpoint_url, "key": key}) from None
        elapsed = time.monotonic() - t0
        logs.event(log, "uploaded", bucket=self.bucket, key=key, bytes=size, elapsed_s=round(elapsed, 3),
                   mb_per_s=round(size / MB / elapsed, 1) if elapsed > 0 else None)
        return {"url": url, "s3_uri": f"s3://{self.bucket}/{key}"}

    def fetch(self, uri: str, field: str, max_bytes: int) -> bytes:
        """An `s3://bucket/key` input, size-checked before a byte of it is read."""
        body = bytearray()
        self.stream(uri, field, max_bytes, too_large(field, max_bytes), body.extend)
        return bytes(body)

    def head(self, uri: str, field: str) -> tuple[str, int]:
        """The object's ETag and size: what proves a cached copy is the same object."""
        bucket, key = self._locate(uri, field)
        with self._reading(uri, field):
            head = self.client.head_object(Bucket=bucket, Key=key)
        return str(head.get("ETag", "")), int(head["ContentLength"])

    def stream(self, uri: str, field: str, max_bytes: int, too_big: JobError,
               sink: Callable[[bytes], object]) -> int:
        """Hand the object to `sink` chunk by chunk, refused with `too_big` past `max_bytes`
        (by its size before a byte is read, and while reading); returns its size."""
        bucket, key = self._locate(uri, field)
        size = 0
        with self._reading(uri, field):
            if self.client.head_object(Bucket=bucket, Key=key)["ContentLength"] > max_bytes:
                raise too_big
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                # Bounded even if the object grew between HEAD and GET.
                for chunk in body.iter_chunks(MB):
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_big
                    sink(chunk)
            finally:
                body.close()
        return size

    def _locate(self, uri: str, field: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise validation(f"{field}: expected s3://bucket/key")
        if bucket != self.bucket:
            raise validation(f"{field}: only objects in this endpoint's bucket ({self.bucket}) can be read")
        return bucket, key

    @contextlib.contextmanager
    def _reading(self, uri: str, field: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _MISSING:
                raise validation(f"{field}: {uri} does not exist") from None
            if code in _DENIED:
                raise validation(f"{field}: access to {uri} is denied") from None
            raise self._unreachable(f"could not read {uri}", exc) from None
        except BotoCoreError as exc:
            raise self._unreachable(f"could not read {uri}", exc) from None

    def _unreachable(self, what: str, exc: Exception) -> JobError:
        return JobError("storage", f"{what} from {self.where}: {_reason(exc)}",
                        {"bucket": self.bucket, "endpoint": self.settings.endpoint_url})


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _reason(exc: Exception) -> str:
    # Only the error's code or class: server messages and botocore's texts can carry URLs.
    if isinstance(exc, ClientError):
        return f"{_code(exc)} ({exc.operation_name})"
    return type(exc).__name__
