"""`diffbox.storage.stores` and `diffbox.storage.s3` against a real S3-compatible server (moto, on loopback)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from diffbox.config import S3Settings
from diffbox.errors import JobError
from diffbox.storage.s3 import S3Store
from diffbox.storage.stores import InlineStore, OutputUploads, choose_store, object_key
from tests.conftest import free_port
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def store_for(server: S3Server | str, bucket: str, **overrides: Any) -> S3Store:
    endpoint = server if isinstance(server, str) else server.endpoint
    values: dict[str, Any] = {
        "bucket": bucket, "endpoint_url": endpoint, "region": REGION,
        "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY, **overrides,
    }
    return S3Store(S3Settings.model_validate(values))


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


def at(path: Path) -> Callable[[], Path]:
    return lambda: path


def write(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_put_uploads_with_content_type_and_presigned_url(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = store_for(s3_server, bucket, url_ttl_s=900)
    path = tmp_path / "out.png"
    path.write_bytes(PNG_1PX)
    fields = store.put(path, "renders/job-1/out.png", "image/png")
    assert fields["s3_uri"] == f"s3://{bucket}/renders/job-1/out.png"
    head = s3_server.client().head_object(Bucket=bucket, Key="renders/job-1/out.png")
    assert head["ContentType"] == "image/png"
    response = requests.get(fields["url"], timeout=10)
    assert response.status_code == 200
    assert response.content == PNG_1PX
    # moto does not enforce expiry: the TTL is checked in the signed URL itself.
    query = parse_qs(urlsplit(fields["url"]).query)
    assert query["X-Amz-Expires"] == ["900"]
    assert SECRET_KEY not in fields["url"]


def test_large_file_goes_in_multipart_parts(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = store_for(s3_server, bucket, part_size_mb=5, multipart_threshold_mb=5)
    path = write(tmp_path / "big.mp4", 11 * 1024 * 1024 + 123)
    fields = store.put(path, "job-2/big.mp4", "video/mp4")
    head = s3_server.client().head_object(Bucket=bucket, Key="job-2/big.mp4")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    assert head["ContentLength"] == path.stat().st_size
    assert head["ContentType"] == "video/mp4"
    downloaded = requests.get(fields["url"], timeout=30).content
    assert hashlib.sha256(downloaded).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_output_uploads_start_while_the_job_runs_and_report_in_order(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    store = store_for(s3_server, bucket)
    uploads = OutputUploads(store)
    files = [write(tmp_path / f"{i}.webm", 1000 + i) for i in range(3)]
    try:
        for i, path in enumerate(files):
            uploads.add(object_key("p", "job-3", path.name), at(path), False, {"node": str(i)})
        # Before results() is asked, the objects arrive on their own.
        client, deadline = s3_server.client(), time.monotonic() + 20
        while client.list_objects_v2(Bucket=bucket, Prefix="p/job-3/").get("KeyCount", 0) < 3:
            assert time.monotonic() < deadline, "uploads did not start before the end of the job"
            time.sleep(0.05)
        results = uploads.results()
    finally:
        uploads.close()
    assert [r["node"] for r in results] == ["0", "1", "2"]
    for path, result in zip(files, results, strict=True):
        assert result["s3_uri"] == f"s3://{bucket}/p/job-3/{path.name}"
        assert result["content_type"] == "video/webm"
        assert result["bytes"] == path.stat().st_size
        assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert "data" not in result


def test_same_name_twice_gets_two_keys(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    uploads = OutputUploads(store_for(s3_server, bucket))
    a, b = write(tmp_path / "a.bin", 10), write(tmp_path / "b.bin", 20)
    try:
        uploads.add("job/x.bin", at(a), False, {})
        uploads.add("job/x.bin", at(b), False, {})
        first, second = uploads.results()
    finally:
        uploads.close()
    assert first["s3_uri"] != second["s3_uri"]
    assert requests.get(second["url"], timeout=10).content == b.read_bytes()


def test_inline_over_the_limit_fails_before_any_base64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InlineStore(max_bytes=1500)
    monkeypatch.setattr(store, "put", lambda *a: pytest.fail("base64 built above the inline limit"))
    uploads = OutputUploads(store)
    for i in range(2):
        path = write(tmp_path / f"{i}.png", 1000)
        uploads.add(f"job/{i}.png", at(path), False, {})
    with pytest.raises(JobError) as err:
        uploads.results()
    uploads.close()
    assert err.value.type == "storage"
    assert "DIFFBOX_MAX_INLINE_MB" in err.value.message and "DIFFBOX_S3_BUCKET" in err.value.message


def test_inline_under_the_limit(tmp_path: Path) -> None:
    uploads = OutputUploads(InlineStore(max_bytes=10_000))
    path = tmp_path / "x.png"
    path.write_bytes(PNG_1PX)
    uploads.add("job/x.png", at(path), False, {"node": "9"})
    (result,) = uploads.results()
    uploads.close()
    assert result["node"] == "9" and result["kind"] == "image" and result["width"] == 1
    assert "url" not in result and result["data"]


def test_choose_store(s3_server: S3Server, bucket: str) -> None:
    s3 = store_for(s3_server, bucket)
    assert choose_store(None, s3, 10).name == "s3"
    assert choose_store("inline", s3, 10).name == "inline"
    assert choose_store(None, None, 10).name == "inline"
    with pytest.raises(JobError) as err:
        choose_store("s3", None, 10)
    assert err.value.type == "validation" and err.value.message.startswith("output.store:")


def test_fetch_reads_a_key_of_the_configured_bucket(s3_server: S3Server, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="in/a.png", Body=PNG_1PX)
    store = store_for(s3_server, bucket)
    assert store.fetch(f"s3://{bucket}/in/a.png", "image", 10_000) == PNG_1PX


@pytest.mark.parametrize(("uri", "words"), [
    ("s3://{bucket}/in/missing.png", "does not exist"),
    ("s3://{bucket}/in/big.png", "larger than"),
    ("s3://another-bucket/x.png", "only objects in this endpoint's bucket"),
    ("s3://{bucket}", "expected s3://bucket/key"),
])
def test_fetch_refusals_name_the_field(s3_server: S3Server, bucket: str, uri: str, words: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="in/big.png", Body=b"\0" * 2000)
    store = store_for(s3_server, bucket)
    with pytest.raises(JobError) as err:
        store.fetch(uri.format(bucket=bucket), "images[0].image", 1000)
    assert err.value.type == "validation"
    assert err.value.message.startswith("images[0].image: ") and words in err.value.message
    assert SECRET_KEY not in err.value.message and ACCESS_KEY not in err.value.message


def test_missing_bucket_is_a_storage_error(s3_server: S3Server, tmp_path: Path) -> None:
    store = store_for(s3_server, "no-such-bucket-here")
    with pytest.raises(JobError) as err:
        store.put(write(tmp_path / "x.bin", 10), "job/x.bin", "application/octet-stream")
    assert err.value.type == "storage"
    assert "'no-such-bucket-here'" in err.value.message and "NoSuchBucket" in err.value.message


def test_unreachable_endpoint_fails_in_seconds_naming_bucket_and_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = store_for(endpoint, "outputs")
    t0 = time.monotonic()
    with pytest.raises(JobError) as err:
        store.put(write(tmp_path / "x.bin", 10), "job/x.bin", "application/octet-stream")
    assert time.monotonic() - t0 < 15
    assert err.value.type == "storage"
    assert "'outputs'" in err.value.message and endpoint in err.value.message
    assert SECRET_KEY not in str(err.value.to_dict()) and ACCESS_KEY not in str(err.value.to_dict())


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: a store that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hanging_endpoint_is_bounded_by_the_read_timeout(silent_server: str, tmp_path: Path) -> None:
    store = store_for(silent_server, "outputs", read_timeout_s=0.5, max_attempts=2)
    t0 = time.monotonic()
    with pytest.raises(JobError) as err:
        store.put(write(tmp_path / "x.bin", 10), "job/x.bin", "application/octet-stream")
    assert time.monotonic() - t0 < 10
    assert err.value.type == "storage" and "ReadTimeoutError" in err.value.message


class _Flaky(ThreadingHTTPServer):
    """Answers 503 SlowDown to the first `failures` PUTs, then forwards to moto."""

    def __init__(self, target: str, failures: int) -> None:
        self.target, self.failures, self.seen = target, failures, 0
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(BaseHTTPRequestHandler):
    server: _Flaky

    def log_message(self, *args: Any) -> None:
        return None

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.server.seen < self.server.failures:
            self.server.seen += 1
            error = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        response = requests.request(self.command, self.server.target + self.path, data=body,
                                    headers=headers, timeout=10)
        self.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_transient_errors_are_retried(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    flaky = _Flaky(s3_server.endpoint, failures=2)
    thread = threading.Thread(target=flaky.serve_forever, daemon=True)
    thread.start()
    try:
        store = store_for(f"http://127.0.0.1:{flaky.server_address[1]}", bucket, max_attempts=3)
        path = write(tmp_path / "x.bin", 1000)
        store.put(path, "job/x.bin", "application/octet-stream")
    finally:
        flaky.shutdown()
    assert flaky.seen == 2
    body = s3_server.client().get_object(Bucket=bucket, Key="job/x.bin")["Body"].read()
    assert body == path.read_bytes()
