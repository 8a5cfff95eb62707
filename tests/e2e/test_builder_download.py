"""`python -m builder download|verify` end to end: the real CLI and huggingface_hub against a
Hub on loopback (HF_ENDPOINT), with small files in a manifest of the real shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.weights import human_size, partial_path
from tests.conftest import REPO
from tests.fakes.hf_hub import FakeHub, serve_fake_hub

BIG = os.urandom(300_000)
VAE = os.urandom(40_000)
LORA = os.urandom(25_000)
TOKEN = "hf_builder_test_token"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as hub:
        hub.add("org/wan", "split_files/diffusion_models/big.safetensors", BIG)
        hub.add("org/wan", "split_files/vae/vae.safetensors", VAE)
        hub.add("org/loras", "lora.safetensors", LORA)
        hub.add("org/chat", "config.json", b'{"model_type": "mistral"}')
        hub.add("org/chat", "model.safetensors", os.urandom(20_000))
        yield hub


def _entry(repo: str, path: str, folder: str, data: bytes, sha256: str | None) -> dict[str, Any]:
    return {"repo": repo, "revision": "main", "path": path, "folder": folder, "size": len(data), "sha256": sha256}


def _manifest(tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    import hashlib

    files = {
        "big": _entry("org/wan", "split_files/diffusion_models/big.safetensors", "diffusion_models", BIG,
                      hashlib.sha256(BIG).hexdigest()),
        # No sha256 in the manifest: checked against the Hub's LFS ETag instead.
        "vae": _entry("org/wan", "split_files/vae/vae.safetensors", "vae", VAE, None),
        "lora": _entry("org/loras", "lora.safetensors", "loras", LORA, hashlib.sha256(LORA).hexdigest()),
    }
    for key, changes in overrides.items():
        files[key] = {**files.get(key, files["lora"]), **changes}
    workflows = {"i2v": {"fast": list(files), "quality": ["big", "vae"]}}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"files": files, "workflows": workflows}))
    return path


def _builder(hub: FakeHub, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HOME=str(Path(args[-1]).parent / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_download_fills_comfyui_folders_then_skips_what_is_complete(hub: FakeHub, tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    first = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                     "--dest", dest)
    assert first.returncode == 0, first.stderr
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == BIG
    assert (dest / "vae" / "vae.safetensors").read_bytes() == VAE
    assert (dest / "loras" / "lora.safetensors").read_bytes() == LORA
    assert not list(dest.rglob("*.incomplete"))
    config = yaml.safe_load((dest / "extra_model_paths.yaml").read_text())["diffbox"]
    assert config["base_path"] == str(dest)
    # HF_TOKEN goes to the Hub, never to the CDN host of a signed URL.
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.seen("HEAD", "/org/wan/resolve/"))
    assert all("authorization" not in r.headers for r in hub.seen("GET", "/cdn/"))

    fetched = len(hub.seen("GET", "/cdn/"))
    again = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--dest", dest)
    assert again.returncode == 0, again.stderr
    assert len(hub.seen("GET", "/cdn/")) == fetched
    assert "present diffusion_models/big.safetensors" in again.stderr


def test_partial_file_resumes_from_where_it_stopped(hub: FakeHub, tmp_path: Path) -> None:
    import hashlib

    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    final = dest / "diffusion_models" / "big.safetensors"
    partial = partial_path(final, hashlib.sha256(BIG).hexdigest())
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[:123_456])
    before = len(hub.requests)
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                      "--dest", dest)
    assert result.returncode == 0, result.stderr
    assert final.read_bytes() == BIG
    big_sha = hashlib.sha256(BIG).hexdigest()
    ranges = [r.headers.get("range") for r in hub.requests[before:] if r.path == f"/cdn/{big_sha}"]
    assert ranges == ["bytes=123456-"]
    assert not partial.exists()


def test_checksum_mismatch_and_404_are_reported_with_repo_and_path(hub: FakeHub, tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        lora={"sha256": "0" * 64},
        gone={"repo": "org/wan", "path": "split_files/loras/gone.safetensors", "folder": "loras",
              "size": 10, "sha256": None},
    )
    dest = tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                      "--dest", dest)
    assert result.returncode == 1
    lines = {line.split()[0] + " " + line.split()[2]: line for line in result.stderr.splitlines()
             if line.startswith(("org/", "FAILED"))}
    assert "sha256 mismatch: expected " + "0" * 64 in lines["org/loras lora.safetensors"]
    assert "HTTP 404: not found" in lines["org/wan split_files/loras/gone.safetensors"]
    # One bad file stops neither the others nor leaves a partial behind.
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == BIG
    assert not (dest / "loras" / "lora.safetensors").exists()
    assert not list(dest.rglob("*.incomplete"))


def test_a_file_of_unknown_size_is_fetched_and_verified_by_its_hash(hub: FakeHub, tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path, lora={"size": None}), tmp_path / "models"
    plan = _builder(hub, "plan", "--workflows", "i2v", "--presets", "fast", "--manifest", manifest)
    assert plan.returncode == 0, plan.stderr
    assert f"3 files, {human_size(len(BIG) + len(VAE))} ({len(BIG) + len(VAE)} bytes) plus 1 of unknown size" in \
        plan.stdout
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                      "--dest", dest)
    assert result.returncode == 0, result.stderr
    assert (dest / "loras" / "lora.safetensors").read_bytes() == LORA
    verify = _builder(hub, "verify", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast", "--all",
                      "--dest", dest)
    assert verify.returncode == 0, verify.stdout
    [row] = [line for line in verify.stdout.splitlines() if "loras/lora.safetensors" in line]
    assert row.split()[0] == "ok" and row.split()[-1] == "sha256"


def test_chat_model_is_fetched_as_a_snapshot(hub: FakeHub, tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "none", "--chat-model",
                      "org/chat@main", "--dest", dest)
    assert result.returncode == 0, result.stderr
    snapshot = dest / "llm" / "org" / "chat"
    assert json.loads((snapshot / "config.json").read_text()) == {"model_type": "mistral"}
    assert (snapshot / "model.safetensors").stat().st_size == 20_000
