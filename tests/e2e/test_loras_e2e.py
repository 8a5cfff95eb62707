"""LoRAs a request brings, through the whole worker (in-process `Service`, the fake ComfyUI):
from the loopback Hub, an https server behind the URL guard, and moto's S3; cached on the
models volume, refused when they are not safe LoRAs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diffbox.backends import comfyui_job
from diffbox.inputs.urls import UrlPolicy
from diffbox.loras.cache import LoraCache
from diffbox.service import Service
from tests.conftest import ComfyTarget
from tests.e2e import test_workflows_e2e
from tests.fakes.comfyui.faults import set_config
from tests.fakes.hf_hub import FakeHub, serve_fake_hub
from tests.jobkit import job_files, png_b64, queue_ids, settings, wait_until
from tests.lorafiles import CIVITAI_TOKEN, HF_TOKEN, lora_bytes, pickle_bytes
from tests.s3 import S3Server
from tests.urlserver import PUBLIC_IP, NetGuard, Resolver, UrlServer, make_tls

IMAGE = png_b64((90, 30, 160), (64, 48))
comfy = test_workflows_e2e.comfy  # the fake with a placeholder for every weight, and quick steps


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as hub:
        yield hub


@pytest.fixture
def models(comfy: ComfyTarget, tmp_path: Path) -> Path:
    """A fresh LoRA cache for each test (the rest of the models folder is the fake's)."""
    assert comfy.base_dir is not None
    cache = comfy.base_dir / "models" / "loras" / "diffbox-cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    return comfy.base_dir / "models"


def service(comfy: ComfyTarget, tmp_path: Path, hub: FakeHub | None = None, **overrides: Any) -> Service:
    assert comfy.base_dir is not None
    values: dict[str, Any] = {"models_dir": comfy.base_dir / "models", **overrides}
    if hub is not None:
        values["hf_endpoint"] = hub.url
    return Service(settings(comfy, tmp_path, **values))


def i2v(*loras: dict[str, Any]) -> dict[str, Any]:
    return {"workflow": "i2v", "image": IMAGE, "prompt": "a fox", "frames": 5, "seed": 1, "loras": list(loras)}


def publish(hub: FakeHub, repo: str, path: str, data: bytes) -> str:
    """Commit `data` at `path` on the Hub; returns its sha256."""
    hub.add(repo, path, data)
    return hashlib.sha256(data).hexdigest()


def nothing_left(comfy: ComfyTarget, tmp_path: Path, *job_ids: str) -> None:
    # Not jobkit's Baseline: the loopback Hub keeps huggingface_hub's connections (and their threads) open.
    for job_id in job_ids:
        assert not (tmp_path / "work" / job_id).exists(), job_id
        # ComfyUI's side of a job that succeeded goes just after its result.
        wait_until(lambda job_id=job_id: job_files(comfy, job_id) == [], 5, f"{job_id}'s files removed")
    assert queue_ids(comfy.url) == ([], [])


def cached(models: Path) -> set[str]:
    return {p.name for p in (models / "loras" / "diffbox-cache").glob("*.safetensors")}


async def test_an_hf_lora_is_downloaded_once_then_served_from_the_cache(
        comfy: ComfyTarget, hub: FakeHub, models: Path, tmp_path: Path) -> None:
    data = lora_bytes(1)
    sha = publish(hub, "someone/wan-lora", "motion/fast.safetensors", data)
    svc = service(comfy, tmp_path, hub, hf_token=HF_TOKEN)
    events: list[dict[str, Any]] = []
    first = await svc.run("lora-1", i2v({"source": "hf://someone/wan-lora/motion/fast.safetensors",
                                         "strength": 0.75, "target": "high"}), events.append)
    assert "error" not in first, first
    assert first["loras"] == [{"source": "hf://someone/wan-lora/motion/fast.safetensors", "sha256": sha,
                               "bytes": len(data), "cache_hit": False, "strength": 0.75, "target": "high"}]
    assert first["timings"]["download_s"] >= 0
    downloading = [e for e in events if e["stage"] == "downloading"]
    assert downloading and downloading[-1].get("total") in (None, len(data))
    assert cached(models) == {f"{sha}.safetensors"}
    assert len(hub.seen("GET", sha)) == 1
    # The token goes to the Hub, never to the host that serves the file's bytes.
    [head] = hub.seen("HEAD", "/someone/wan-lora/resolve/")
    assert head.headers.get("authorization") == f"Bearer {HF_TOKEN}"
    assert "authorization" not in hub.seen("GET", sha)[0].headers

    second = await svc.run("lora-2", i2v({"source": "hf://someone/wan-lora/motion/fast.safetensors"}))
    assert second["loras"][0]["cache_hit"] is True and second["loras"][0]["sha256"] == sha
    assert len(hub.seen("GET", sha)) == 1  # only the Hub's HEAD proved it the same file

    # A commit id names the bytes for good: a cached copy costs no request at all.
    asked = len(hub.requests)
    commit = hub.commit("someone/wan-lora")
    third = await svc.run("lora-3", i2v({"source": f"hf://someone/wan-lora@{commit}/motion/fast.safetensors"}))
    assert "error" not in third, third
    fourth = await svc.run("lora-4", i2v({"source": f"hf://someone/wan-lora/motion/fast.safetensors@{commit}"}))
    assert third["loras"][0]["cache_hit"] is True and fourth["loras"][0]["cache_hit"] is True
    assert len(hub.requests) == asked  # the first download recorded which commit it came from
    nothing_left(comfy, tmp_path, "lora-1", "lora-2", "lora-3", "lora-4")


async def test_two_concurrent_jobs_download_one_file_once(
        comfy: ComfyTarget, hub: FakeHub, models: Path, tmp_path: Path) -> None:
    sha = publish(hub, "someone/shared", "s.safetensors", lora_bytes(2, features=256))
    job = i2v({"source": "hf://someone/shared/s.safetensors"})
    a, b = service(comfy, tmp_path / "a", hub), service(comfy, tmp_path / "b", hub)
    results = await asyncio.gather(a.run("shared-a", job), b.run("shared-b", job))
    assert all("error" not in r for r in results), results
    assert sorted(r["loras"][0]["cache_hit"] for r in results) == [False, True]
    assert len(hub.seen("GET", sha)) == 1
    assert cached(models) == {f"{sha}.safetensors"}


async def test_a_tiny_budget_evicts_the_least_recently_used(
        comfy: ComfyTarget, hub: FakeHub, models: Path, tmp_path: Path) -> None:
    one = publish(hub, "someone/one", "a.safetensors", lora_bytes(3))
    two = publish(hub, "someone/two", "b.safetensors", lora_bytes(4))
    svc = service(comfy, tmp_path, hub, lora_cache_gb=1e-9)  # one byte: every entry is over budget
    assert "error" not in await svc.run("evict-1", i2v({"source": "hf://someone/one/a.safetensors"}))
    assert cached(models) == {f"{one}.safetensors"}  # pinned by its job while it was added
    assert "error" not in await svc.run("evict-2", i2v({"source": "hf://someone/two/b.safetensors"}))
    assert cached(models) == {f"{two}.safetensors"}


async def test_refusals_name_the_entry_and_leave_nothing(
        comfy: ComfyTarget, hub: FakeHub, models: Path, tmp_path: Path) -> None:
    hub.add("someone/wan-lora", "motion/fast.safetensors", lora_bytes(1))
    hub.add("someone/bad", "pickle.safetensors", pickle_bytes())
    hub.add("someone/bad", "cut.safetensors", lora_bytes(5)[:-10])
    hub.add("someone/bad", "big.safetensors", lora_bytes(6, rank=160, features=512))
    svc = service(comfy, tmp_path, hub, max_lora_mb=0.5)
    ok = {"source": "hf://someone/wan-lora/motion/fast.safetensors"}
    for path, words in [("pickle", "not a safetensors file"), ("cut", "truncated"),
                        ("big", "larger than the 0.5 MB limit (DIFFBOX_MAX_LORA_MB)"),
                        ("missing", "not found")]:
        result = await svc.run(f"bad-{path}", i2v(ok, {"source": f"hf://someone/bad/{path}.safetensors"}))
        error = result["error"]
        assert error["type"] == "validation" and error["message"].startswith("loras[1].source: "), error
        assert words in error["message"], error
    with serve_fake_hub() as gone:
        pass  # a Hub that no longer answers
    error = (await service(comfy, tmp_path, gone).run("bad-hub", i2v(ok)))["error"]
    assert error["message"] == ("loras[0].source: could not fetch hf://someone/wan-lora/motion/fast.safetensors "
                                "from the Hub: ConnectError")
    qwen = {"workflow": "qwen_edit", "images": [IMAGE], "prompt": "p",
            "loras": [{"source": "hf://someone/bad/cut.safetensors", "target": "low"}]}
    error = (await svc.run("bad-target", qwen))["error"]
    assert error["type"] == "validation" and error["message"].startswith("loras.0.target: Qwen Image Edit has one")
    assert not any(p.name.endswith(".part") for p in (models / "loras" / "diffbox-cache" / ".tmp").iterdir())
    assert len(cached(models)) == 1  # the good one
    nothing_left(comfy, tmp_path, "bad-pickle", "bad-cut", "bad-big", "bad-target")


@pytest.fixture
def web(tmp_path: Path, net_guard: NetGuard) -> Iterator[tuple[UrlServer, UrlPolicy, list[str | None]]]:
    """An https server at public names (civitai.com, public.test) behind the URL guard; the
    third item collects the Authorization header of each request it serves."""
    ca = make_tls(tmp_path, ("public.test", "civitai.com"))
    server = UrlServer(tls=ca.server_context).start()
    auth: list[str | None] = []
    files = {"/lora.safetensors": lora_bytes(8), "/pickle": pickle_bytes()}

    def serve(h: Any, q: dict[str, str]) -> None:
        auth.append(h.headers.get("Authorization"))
        data = files[h.path.split("?")[0]]
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if h.headers.get("If-None-Match") == etag:
            h._send(304, b"", {"ETag": etag})
        else:
            h._send(200, data, {"ETag": etag})

    def civitai(h: Any, q: dict[str, str]) -> None:
        auth.append(h.headers.get("Authorization"))
        h._send(307, b"", {"Location": f"https://public.test:{server.port}/lora.safetensors?sig=x"})

    server.routes.update({"/lora.safetensors": serve, "/pickle": serve, "/api/download/models/1": civitai})
    resolver = Resolver()
    resolver.add("public.test", [PUBLIC_IP])
    resolver.add("civitai.com", [PUBLIC_IP])
    net_guard.routes[PUBLIC_IP] = server.port
    yield server, UrlPolicy(resolver=resolver, ca_file=str(ca.ca_file)), auth
    server.stop()


async def test_an_https_lora_through_the_url_guard_with_the_civitai_token_kept_to_civitai(
        comfy: ComfyTarget, models: Path, tmp_path: Path,
        web: tuple[UrlServer, UrlPolicy, list[str | None]]) -> None:
    server, policy, auth = web
    svc = service(comfy, tmp_path, civitai_token=CIVITAI_TOKEN)
    svc.url_policy = policy
    source = f"https://civitai.com:{server.port}/api/download/models/1"
    first = await svc.run("web-1", i2v({"source": source, "target": "low"}))
    assert "error" not in first, first
    sha = hashlib.sha256(lora_bytes(8)).hexdigest()
    assert first["loras"][0]["sha256"] == sha
    assert auth == [f"Bearer {CIVITAI_TOKEN}", None]  # the storage host it redirects to gets none
    requests_before = len(server.requests)
    # A URL names no version: the cached copy is proved current by a conditional request (304, no body).
    second = await svc.run("web-2", i2v({"source": source}))
    assert second["loras"][0]["cache_hit"] is True and len(server.requests) == requests_before + 2
    # Naming the bytes skips even that.
    third = await svc.run("web-3", i2v({"source": source, "sha256": sha}))
    assert third["loras"][0]["cache_hit"] is True and len(server.requests) == requests_before + 2
    wrong = "0" * 64
    error = (await svc.run("web-4", i2v({"source": f"https://public.test:{server.port}/lora.safetensors",
                                         "sha256": wrong})))["error"]
    assert error["message"] == f"loras[0].source: the file's sha256 is {sha}, not the expected {wrong}"

    for url, words in [(f"https://public.test:{server.port}/pickle", "not a safetensors file"),
                       (f"https://public.test:{server.port}/redirect?to=https://10.1.2.3/x.safetensors",
                        "10.1.2.3 is not a public address"),
                       (f"https://127.0.0.1:{server.port}/lora.safetensors", "127.0.0.1 is not a public address")]:
        error = (await svc.run("web-bad", i2v({"source": url})))["error"]
        assert error["type"] == "validation" and error["message"].startswith("loras[0].source: "), error
        assert words in error["message"]


async def test_an_s3_lora_from_the_endpoints_bucket(comfy: ComfyTarget, models: Path, tmp_path: Path,
                                                    s3_server: S3Server) -> None:
    from diffbox.config import Settings

    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="loras/style.safetensors", Body=lora_bytes(9))
    s3 = Settings.from_env(s3_server.env(bucket)).s3
    svc = service(comfy, tmp_path, s3=s3)
    job = i2v({"source": f"s3://{bucket}/loras/style.safetensors"})
    first, second = await svc.run("s3-1", job), await svc.run("s3-2", job)
    assert (first["loras"][0]["cache_hit"], second["loras"][0]["cache_hit"]) == (False, True), (first, second)
    error = (await svc.run("s3-bad", i2v({"source": "s3://another-bucket/x.safetensors"})))["error"]
    assert error["message"].startswith("loras[0].source: only objects in this endpoint's bucket")


async def test_a_cancel_while_downloading_stops_the_job(comfy: ComfyTarget, hub: FakeHub, models: Path,
                                                        tmp_path: Path) -> None:
    hub.add("someone/cancel", "c.safetensors", lora_bytes(10, features=256))
    stop = threading.Event()
    stop.set()
    result = await service(comfy, tmp_path, hub).run(
        "cancel", i2v({"source": "hf://someone/cancel/c.safetensors"}), stop=stop)
    assert result["error"]["type"] == "cancelled"
    assert cached(models) == set()


async def test_a_stopped_jobs_loras_stay_pinned_until_its_prompt_has_left_comfyui(
        comfy: ComfyTarget, hub: FakeHub, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake's node_delay_s is a node's own work, deaf to an interrupt for 5 s: the cancelled
    # job gives up waiting after STOP_GRACE_S while its prompt still runs and reads the LoRA.
    # (A real ComfyUI node cannot be made to ignore an interrupt on purpose.)
    monkeypatch.setattr(comfyui_job, "STOP_GRACE_S", 0.5)
    sha = publish(hub, "someone/held", "h.safetensors", lora_bytes(6))
    svc = service(comfy, tmp_path, hub)
    stop = threading.Event()

    def on_progress(update: dict[str, Any]) -> None:
        if update["stage"] == "running":
            stop.set()

    set_config(comfy.url, node_delay_s=5.0)
    try:
        result = await svc.run("held", i2v({"source": "hf://someone/held/h.safetensors"}), on_progress, stop)
        assert result["error"]["type"] == "cancelled", result
        [prompt] = queue_ids(comfy.url)[0]  # still running: the window
        evictor = LoraCache(models / "loras", budget_bytes=0)
        assert evictor.evict() == [] and cached(models) == {f"{sha}.safetensors"}
        await asyncio.to_thread(wait_until, lambda: queue_ids(comfy.url) == ([], []), 30, f"{prompt} ended")
    finally:
        set_config(comfy.url, node_delay_s=0.0)
    # The next job finds the prompt gone and lets its pins go: the entry may now be evicted.
    assert "error" not in await svc.run("after-held", i2v())
    assert evictor.evict() == [sha] and cached(models) == set()
    nothing_left(comfy, tmp_path, "held", "after-held")


def test_replace_keeps_policy_fields() -> None:
    # The https fetch widens only the total time of the job's URL policy.
    policy = UrlPolicy(allow_private=False, read_timeout_s=3)
    assert replace(policy, total_timeout_s=900).read_timeout_s == 3
