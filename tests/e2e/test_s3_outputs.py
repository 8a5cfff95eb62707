"""Outputs to S3-compatible storage, end to end: `python handler.py --rp_serve_api` with
test_input.json's graph, moto's S3 server on loopback as the store.

What the worker logs is checked too: never a presigned URL, a signature or a credential.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from tests.conftest import TEST_INPUT, ComfyTarget, RunpodApi, free_port, start_runpod_api, worker_env
from tests.jobkit import wait_until
from tests.s3 import ACCESS_KEY, SECRET_KEY, S3Server

TTL_S = 3600


def _start(comfy: ComfyTarget, tmp: Path, **env: str) -> RunpodApi:
    return start_runpod_api(worker_env(comfy, tmp / "work", **env), tmp / "handler.log")


def run_on_own_worker(comfy: ComfyTarget, tmp: Path, jobs: list[dict[str, Any]],
                      **env: str) -> tuple[RunpodApi, list[dict[str, Any]]]:
    """`jobs` run on a worker started with `env` (stopped afterwards); their responses."""
    api = _start(comfy, tmp, **env)
    try:
        return api, [api.runsync(job) for job in jobs]
    finally:
        api.stop()


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def s3_api(comfyui: ComfyTarget, s3_server: S3Server, bucket: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    api = _start(comfyui, tmp_path_factory.mktemp("s3-worker"), **s3_server.env(
        bucket, DIFFBOX_S3_PREFIX="renders", DIFFBOX_S3_URL_TTL_S=str(TTL_S), DIFFBOX_S3_PART_SIZE_MB="5",
        DIFFBOX_S3_MULTIPART_THRESHOLD_MB="5", DIFFBOX_LOG_LEVEL="DEBUG"))  # DEBUG: when prompts end
    yield api
    api.stop()
    assert_no_secrets(api.logs())


def assert_no_secrets(text: str) -> None:
    for secret in (SECRET_KEY, ACCESS_KEY, "X-Amz-Signature", "X-Amz-Credential"):
        assert secret not in text


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    """The job's error object (the SDK's local API may carry it as JSON text)."""
    assert body["status"] == "FAILED", body
    error = body["error"]
    return dict(json.loads(error) if isinstance(error, str) else error)


def key_of(s3_uri: str) -> str:
    return s3_uri.split("/", 3)[3]


def assert_job_files_removed(comfy: ComfyTarget, api: RunpodApi, job_id: str) -> None:
    """The job's inputs and outputs left neither ComfyUI's folders nor the worker's (ComfyUI's
    are removed just after the result is handed back)."""
    assert not (worker_dir(api) / job_id).exists()
    if comfy.base_dir is not None:
        # A job's folder is named after its id (and a per-run suffix).
        folders = [comfy.base_dir / folder / "diffbox" for folder in ("input", "output")]
        wait_until(lambda: not any(list(f.glob(f"{job_id}*")) for f in folders), 5, "job folders removed")


def worker_dir(api: RunpodApi) -> Path:
    return api.log_path.parent / "work"


def noise_png(width: int, height: int) -> str:
    """An incompressible image, so its inverted copy is as large as it is."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_outputs_are_uploaded_with_presigned_urls(
    s3_api: RunpodApi, s3_server: S3Server, bucket: str, comfyui: ComfyTarget
) -> None:
    body = s3_api.runsync(TEST_INPUT["input"])
    assert body["status"] == "COMPLETED", body
    images = body["output"]["images"]
    assert {i["content_type"] for i in images} == {"image/png", "video/mp4"}
    client = s3_server.client()
    for image in images:
        assert image["type"] == "s3_url" and image["data"] == image["url"]
        key = key_of(image["s3_uri"])
        assert image["s3_uri"] == f"s3://{bucket}/{key}"
        assert key == f"renders/{body['id']}/{image['filename']}"
        downloaded = requests.get(image["url"], timeout=30)
        assert downloaded.status_code == 200
        assert len(downloaded.content) == image["bytes"]
        assert hashlib.sha256(downloaded.content).hexdigest() == image["sha256"]
        assert client.head_object(Bucket=bucket, Key=key)["ContentType"] == image["content_type"]
        assert parse_qs(urlsplit(image["url"]).query)["X-Amz-Expires"] == [str(TTL_S)]
    assert "upload_s" in body["output"]["timings"]
    assert_job_files_removed(comfyui, s3_api, body["id"])


def test_request_chooses_prefix_and_store(s3_api: RunpodApi, bucket: str) -> None:
    body = s3_api.runsync({**TEST_INPUT["input"], "output": {"prefix": "team-a/run-7"}})
    assert body["status"] == "COMPLETED", body
    for image in body["output"]["images"]:
        assert key_of(image["s3_uri"]) == f"team-a/run-7/{body['id']}/{image['filename']}"

    body = s3_api.runsync({**TEST_INPUT["input"], "output": {"store": "inline"}})
    assert body["status"] == "COMPLETED", body
    for image in body["output"]["images"]:
        assert image["type"] == "base64" and "url" not in image and "s3_uri" not in image
        assert hashlib.sha256(base64.b64decode(image["data"])).hexdigest() == image["sha256"]


def test_output_above_the_part_size_goes_in_parts(s3_api: RunpodApi, s3_server: S3Server, bucket: str) -> None:
    job = json.loads(json.dumps(TEST_INPUT["input"]))
    job["images"][0]["image"] = noise_png(1600, 1200)  # about 5.8 MB: more than one 5 MiB part
    # 48 frames of noise at that size: seconds of h264 encoding for ComfyUI, on a fast machine too.
    job["workflow"]["4"]["inputs"]["amount"] = 48
    body = s3_api.runsync(job)
    assert body["status"] == "COMPLETED", body
    png = next(i for i in body["output"]["images"] if i["content_type"] == "image/png")
    assert png["bytes"] > 5 * 1024 * 1024
    head = s3_server.client().head_object(Bucket=bucket, Key=key_of(png["s3_uri"]))
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    downloaded = requests.get(png["url"], timeout=60).content
    assert hashlib.sha256(downloaded).hexdigest() == png["sha256"]
    # Streamed: the image's upload began while ComfyUI still encoded the video (seconds, at
    # this size), before the prompt ended. How long either upload took is the machine's affair.
    events = worker_events(s3_api)
    [upload] = [e for e in events if e["msg"] == "uploaded" and e["key"] == key_of(png["s3_uri"])]
    [queued] = [e for e in events if e["msg"] == "prompt queued" and e["ts"] <= upload["ts"]][-1:]
    [ended] = [e for e in events if e["msg"] == "prompt ended" and e["prompt_id"] == queued["prompt_id"]]
    assert upload["ts"] - upload["elapsed_s"] < ended["ts"]


def worker_events(api: RunpodApi) -> list[dict[str, Any]]:
    """The worker's structured log lines."""
    return [json.loads(line) for line in api.logs().splitlines() if line.startswith("{")]


def test_outputs_are_downloaded_when_comfyui_is_not_on_this_disk(
    comfyui: ComfyTarget, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    env = worker_env(comfyui, tmp_path / "work", **s3_server.env(bucket))
    env.pop("DIFFBOX_COMFYUI_DIR", None)
    api = start_runpod_api(env, tmp_path / "handler.log")
    try:
        body = api.runsync(TEST_INPUT["input"])
    finally:
        api.stop()
    assert body["status"] == "COMPLETED", body
    for image in body["output"]["images"]:
        assert hashlib.sha256(requests.get(image["url"], timeout=30).content).hexdigest() == image["sha256"]
    assert not (tmp_path / "work" / body["id"]).exists()
    # ComfyUI has no API to delete its files: a worker that does not share its disk leaves them.
    if comfyui.base_dir is not None:
        for folder in ("input", "output"):
            for left in (comfyui.base_dir / folder / "diffbox").glob(f"{body['id']}*"):
                shutil.rmtree(left)


def test_s3_inputs(s3_api: RunpodApi, s3_server: S3Server, bucket: str) -> None:
    data = base64.b64decode(TEST_INPUT["input"]["images"][0]["image"])
    s3_server.client().put_object(Bucket=bucket, Key="inputs/in.png", Body=data)
    job = json.loads(json.dumps(TEST_INPUT["input"]))
    job["images"][0]["image"] = f"s3://{bucket}/inputs/in.png"
    body = s3_api.runsync(job)
    assert body["status"] == "COMPLETED", body

    job["images"][0]["image"] = f"s3://{bucket}/inputs/missing.png"
    error = error_of(s3_api.runsync(job))
    assert error["type"] == "validation" and error["message"].startswith("images[0].image: ")
    assert_no_secrets(json.dumps(error))


def test_runpod_variable_names(comfyui: ComfyTarget, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    api, (body,) = run_on_own_worker(
        comfyui, tmp_path, [TEST_INPUT["input"]], DIFFBOX_S3_BUCKET=bucket, BUCKET_ENDPOINT_URL=s3_server.endpoint,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY, BUCKET_SECRET_ACCESS_KEY=SECRET_KEY, BUCKET_PREFIX="official")
    assert body["status"] == "COMPLETED", body
    for image in body["output"]["images"]:
        assert key_of(image["s3_uri"]) == f"official/{body['id']}/{image['filename']}"
        assert hashlib.sha256(requests.get(image["url"], timeout=30).content).hexdigest() == image["sha256"]
    assert_no_secrets(api.logs())


def test_unreachable_store_fails_the_job_and_cleans_up(comfyui: ComfyTarget, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    api, (body,) = run_on_own_worker(
        comfyui, tmp_path, [TEST_INPUT["input"]], DIFFBOX_S3_BUCKET="unreachable-outputs",
        DIFFBOX_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        DIFFBOX_S3_MAX_ATTEMPTS="2")
    error = error_of(body)
    assert error["type"] == "storage"
    assert "'unreachable-outputs'" in error["message"] and endpoint in error["message"]
    assert "output" not in body  # nothing reported as a success
    assert_no_secrets(json.dumps(body))
    assert_no_secrets(api.logs())
    assert_job_files_removed(comfyui, api, body["id"])


def test_inline_limit_and_store_choice_without_s3(comfyui: ComfyTarget, tmp_path: Path) -> None:
    api, (too_big, no_s3) = run_on_own_worker(
        comfyui, tmp_path, [TEST_INPUT["input"], {**TEST_INPUT["input"], "output": {"store": "s3"}}],
        DIFFBOX_MAX_INLINE_MB="0.001")
    error = error_of(too_big)
    assert error["type"] == "storage"
    assert "DIFFBOX_MAX_INLINE_MB" in error["message"] and "DIFFBOX_S3_BUCKET" in error["message"]
    assert_job_files_removed(comfyui, api, too_big["id"])
    error = error_of(no_s3)
    assert error["type"] == "validation" and error["message"].startswith("output.store: ")
