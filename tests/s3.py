"""A real S3-compatible server on loopback for tests and benchmarks: moto's, in its own process.

Its own process so that what it keeps in memory (moto holds every object) never counts in
the worker's measurements, and so a test can stop it to see an unreachable store. moto checks
neither signatures nor presigned-URL expiry.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import requests

from tests import processes

ACCESS_KEY = "AKIADIFFBOXTEST00000"
SECRET_KEY = "diffbox-test-secret-never-logged"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self) -> str:
        name = f"diffbox-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, **extra: str) -> dict[str, str]:
        """The worker's variables for `bucket` on this server (the DIFFBOX_/AWS_ names)."""
        return {
            "DIFFBOX_S3_BUCKET": bucket,
            "DIFFBOX_S3_ENDPOINT_URL": self.endpoint,
            "DIFFBOX_S3_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            **extra,
        }


@contextlib.contextmanager
def start_moto(log_path: Path) -> Iterator[S3Server]:
    from tests.conftest import free_port  # here: conftest imports this module

    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                requests.get(f"{server.endpoint}/moto-api/", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield server
    finally:
        processes.stop(proc, 10)
