"""A worker logging at DEBUG, driven through every path that handles a secret or an image:
S3 credentials, presigned URLs in results, a presigned URL as an input (its signature in the
query), failures that quote an input, base64 images. Its log must hold none of them.

The whole suite's worker logs get the same check at the end of the session (conftest.py); this
test makes sure the risky paths are exercised, whatever else runs.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config

from diffbox.workflows import manifest
from tests.conftest import TEST_INPUT, ComfyTarget, job_error, production_worker, start_runpod_api, worker_env
from tests.fakes.hf_hub import serve_fake_hub
from tests.fakes.runpod_api import FakeRunpodApi
from tests.jobkit import invert_job, png_b64
from tests.loghygiene import scan
from tests.lorafiles import lora_bytes
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server

IMAGE = png_b64((5, 99, 180), (48, 32))


def test_worker_logs_hold_no_secret_signature_or_image(comfyui: ComfyTarget, s3_server: S3Server,
                                                       tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    # SigV4, as the worker signs its own URLs (the test client's default is SigV2).
    signer = boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint, region_name=REGION,
                                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                            config=Config(signature_version="s3v4"))
    client.put_object(Bucket=bucket, Key="in/image.png", Body=base64.b64decode(IMAGE))
    presigned = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "in/image.png"})
    missing = signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "in/missing.png"})
    signatures = [parse_qs(urlsplit(url).query)["X-Amz-Signature"][0] for url in (presigned, missing)]

    env = worker_env(comfyui, tmp_path / "work", **s3_server.env(bucket), DIFFBOX_ALLOW_PRIVATE_URLS="1",
                     DIFFBOX_LOG_LEVEL="DEBUG")
    api = start_runpod_api(env, tmp_path / "handler.log")
    try:
        ok = [api.runsync(job) for job in (
            TEST_INPUT["input"], invert_job(presigned), invert_job(f"s3://{bucket}/in/image.png"),
            {**invert_job(IMAGE), "output": {"store": "inline"}})]
        failed = [api.runsync(job) for job in (
            invert_job(missing), invert_job(IMAGE[:-8] + "@@@@@@@@"),
            invert_job(base64.b64encode(b"x" * 9000).decode()),
            invert_job(f"https://127.0.0.1:1/x.png?X-Amz-Signature={signatures[0]}"),
            {"workflow": "i2v", "image": IMAGE, "prompt": "p", "typo": IMAGE})]
    finally:
        api.stop()
    for body in ok:
        assert body["status"] == "COMPLETED", body
    # The results carry presigned URLs (that is their job); the errors carry nothing secret.
    assert any("X-Amz-Signature=" in json.dumps(body) for body in ok)
    for body in failed:
        error = job_error(body)
        assert error["type"] == "validation", error
        assert not scan_text(json.dumps(error), [*signatures, IMAGE[:40]])
    assert scan([api.log_path], extra=[*signatures, SECRET_KEY, IMAGE[:40]]) == []
    assert '"msg": "fetched"' in api.logs()  # the presigned input went through the logged path


def scan_text(text: str, needles: list[str]) -> list[str]:
    return [n[:6] for n in needles if n in text]


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text('{"msg": "ok", "key": "renders/job/out.png", "sha256": "' + "ab" * 32 + '"}\n'
                   '{"msg": "oops", "url": "https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef"}\n'
                   f'{{"msg": "oops", "secret": "{SECRET_KEY}"}}\n'
                   f'{{"msg": "oops", "image": "{IMAGE}"}}\n'
                   f'{{"msg": "oops", "bytes": "{base64.b64encode(bytes(range(256))).decode()}"}}\n')
    findings = scan([log], extra=[IMAGE[:40]])
    assert [f.split(":")[1] for f in findings] == ["2", "3", "4", "5"]
    assert SECRET_KEY not in "".join(findings)



def test_a_lora_from_the_hub_leaves_no_signed_url_in_runpods_log(fake_comfyui: ComfyTarget, runpod_api: FakeRunpodApi,
                                                                 tmp_path: Path) -> None:
    """The worker as RunPod runs it (its production loop prints what reaches the root logger):
    huggingface_hub fetches through httpx, which logs each request's URL at INFO, and the Hub
    answers a download with a signed CDN URL. (Fake leg: the stand-in nodes make the i2v job
    quick; the real leg's typed tests fetch LoRAs the same way under the session's log check.)"""
    assert fake_comfyui.base_dir is not None
    for f in manifest.load().required("i2v", "fast"):
        f.local_path(fake_comfyui.base_dir / "models").parent.mkdir(parents=True, exist_ok=True)
        f.local_path(fake_comfyui.base_dir / "models").touch()
    with serve_fake_hub() as hub:
        hub.add("someone/style", "style.safetensors", lora_bytes(5))
        env = worker_env(fake_comfyui, tmp_path / "work", **runpod_api.env(), HF_ENDPOINT=hub.url,
                         DIFFBOX_ALLOW_PRIVATE_URLS="1")
        with production_worker(env, tmp_path / "worker.log"):
            runpod_api.add_job("lora-log", {"workflow": "i2v", "image": IMAGE, "prompt": "x", "frames": 5,
                                            "loras": [{"source": "hf://someone/style/style.safetensors"}]})
            deadline = time.monotonic() + 120
            while (final := runpod_api.final("lora-log")) is None and time.monotonic() < deadline:
                time.sleep(0.2)
    assert final is not None and final["output"]["loras"][0]["cache_hit"] is False, final  # it was downloaded
    assert scan([tmp_path / "worker.log"]) == []
