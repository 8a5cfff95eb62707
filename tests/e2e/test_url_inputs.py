"""URL inputs through the whole worker: refused by default without a connection being made,
fetched and used intact where DIFFBOX_ALLOW_PRIVATE_URLS trusts the network (here a loopback
server stands in for a bucket on the same private network)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from diffbox.service import Service
from tests.conftest import ComfyTarget, start_runpod_api, worker_env
from tests.jobkit import Baseline, invert_job, is_inversion_of, png_b64, settings
from tests.urlserver import PUBLIC_IP, NetGuard, Resolver, UrlServer

IMAGE = png_b64((20, 140, 230), (40, 30))


@pytest.fixture
def server() -> Iterator[UrlServer]:
    server = UrlServer(image=base64.b64decode(IMAGE)).start()
    yield server
    server.stop()


async def test_private_urls_are_refused_by_default_without_connecting(
    comfyui: ComfyTarget, server: UrlServer, net_guard: NetGuard, tmp_path: Path
) -> None:
    service = Service(settings(comfyui, tmp_path))
    resolver = Resolver()
    resolver.add("bucket.internal.example", ["10.20.30.40"])
    resolver.add("rebinding.example", [PUBLIC_IP], ["127.0.0.1"])
    service.url_policy = replace(service.url_policy, resolver=resolver)
    for url, words in [
        (server.url("/img.png"), "only https:// URLs are accepted"),
        (f"https://127.0.0.1:{server.port}/img.png", "127.0.0.1 is not a public address"),
        (f"https://localhost:{server.port}/img.png", "could not resolve localhost"),  # not in the test's DNS
        ("https://169.254.169.254/latest/meta-data/iam/security-credentials/", "is not a public address"),
        ("https://bucket.internal.example/in.png", "bucket.internal.example is not a public address"),
    ]:
        error = (await service.run("url", invert_job(url)))["error"]
        assert error["type"] == "validation" and error["message"].startswith("images[0].image: "), error
        assert words in error["message"]
    assert server.connections == 0 and net_guard.attempts == []


async def test_allowed_private_url_arrives_intact(comfyui: ComfyTarget, server: UrlServer, tmp_path: Path) -> None:
    service = Service(settings(comfyui, tmp_path, allow_private_urls=True))
    before = Baseline.take()
    result = await service.run("url-in", invert_job(server.url("/img.png?X-Amz-Signature=not-for-logs")))
    assert "error" not in result, result
    [image] = result["images"]
    assert is_inversion_of(image["data"], IMAGE)
    assert [r.path for r in server.requests] == ["/img.png?X-Amz-Signature=not-for-logs"]
    # The bounds hold on trusted networks too.
    error = (await service.run("url-big", invert_job(server.url("/big"))))["error"]
    assert error["type"] == "validation" and "larger than the 25 MB limit" in error["message"]
    before.assert_nothing_left(comfyui, tmp_path / "work", "url-in", "url-big")


def test_the_setting_reaches_the_worker_from_its_environment(comfyui: ComfyTarget, server: UrlServer,
                                                             tmp_path: Path) -> None:
    api = start_runpod_api(worker_env(comfyui, tmp_path / "work", DIFFBOX_ALLOW_PRIVATE_URLS="1"),
                           tmp_path / "handler.log")
    try:
        body = api.runsync(invert_job(server.url("/img.png")))
    finally:
        api.stop()
    assert body["status"] == "COMPLETED", body
    assert is_inversion_of(body["output"]["images"][0]["data"], IMAGE)
    assert json.dumps(body).count(f"127.0.0.1:{server.port}") == 0  # the result does not echo the URL
