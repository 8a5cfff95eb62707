"""`python -m builder download|verify` end to end: the real CLI and huggingface_hub against a
Hub on loopback (HF_ENDPOINT) that answers as huggingface.co does, with small files in a
manifest of the real shape."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.fakes.hf_hub import FakeHub, serve_fake_hub

BIG = os.urandom(3_000_000)
VAE = os.urandom(40_000)
LORA = os.urandom(25_000)
TOKEN = "hf_builder_test_token"
BIG_PATH = "split_files/diffusion_models/big.safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as hub:
        hub.add("org/wan", BIG_PATH, BIG)
        hub.add("org/wan", "split_files/vae/vae.safetensors", VAE)
        hub.add("org/loras", "lora.safetensors", LORA)
        hub.add("org/chat", "config.json", b'{"model_type": "mistral"}')
        hub.add("org/chat", "model.safetensors", os.urandom(20_000))
        yield hub


def _entry(repo: str, path: str, folder: str, size: int) -> dict[str, Any]:
    return {"repo": repo, "revision": "main", "path": path, "folder": folder, "size": size}


def _manifest(tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    # Sizes as the manifest has them: estimates, a few percent off what the Hub serves.
    files = {
        "big": _entry("org/wan", BIG_PATH, "diffusion_models", int(len(BIG) * 1.03)),
        "vae": _entry("org/wan", "split_files/vae/vae.safetensors", "vae", int(len(VAE) * 0.97)),
        "lora": _entry("org/loras", "lora.safetensors", "loras", 24_000),
    }
    for key, changes in overrides.items():
        files[key] = {**files.get(key, files["lora"]), **changes}
    workflows = {"i2v": {"fast": list(files), "quality": ["big", "vae"]}}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"files": files, "workflows": workflows}))
    return path


def _builder(hub: FakeHub, *args: str | Path, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(Path(args[-1]).parent / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _lock(dest: Path) -> dict[str, Any]:
    files: dict[str, Any] = json.loads((dest / "weights.lock.json").read_text())["files"]
    return files


def _nothing_left_behind(dest: Path) -> None:
    assert not (dest / ".incoming").exists()
    assert not [p for p in dest.rglob("*") if p.name.endswith((".incomplete", ".tmp"))]


def test_estimated_sizes_still_download_and_the_lock_records_what_was_served(hub: FakeHub, tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    first = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                     "--dest", dest)
    assert first.returncode == 0, first.stderr
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == BIG
    assert (dest / "vae" / "vae.safetensors").read_bytes() == VAE
    assert (dest / "loras" / "lora.safetensors").read_bytes() == LORA
    _nothing_left_behind(dest)
    lock = _lock(dest)
    assert {k: (e["commit"], e["size"], e["sha256"]) for k, e in lock.items()} == {
        "big": (hub.commit("org/wan"), len(BIG), sha(BIG)),
        "vae": (hub.commit("org/wan"), len(VAE), sha(VAE)),
        "lora": (hub.commit("org/loras"), len(LORA), sha(LORA))}
    assert lock["big"]["revision"] == "main" and lock["big"]["path"] == BIG_PATH
    assert lock["big"]["fetched_at"].endswith("Z")
    config = yaml.safe_load((dest / "extra_model_paths.yaml").read_text())["diffbox"]
    assert config["base_path"] == str(dest)
    # HF_TOKEN goes to the Hub, never to the CDN host of a signed URL (which would refuse it).
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.seen("HEAD", "/org/wan/resolve/"))
    assert hub.seen("GET", "/repos/") and all("authorization" not in r.headers for r in hub.seen("GET", "/repos/"))

    # Run again: what the lock records and the disk holds is not asked for again.
    before = len(hub.requests)
    again = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--dest", dest)
    assert again.returncode == 0, again.stderr
    assert hub.requests[before:] == []
    assert "present diffusion_models/big.safetensors" in again.stderr
    assert _lock(dest) == lock

    verified = _builder(hub, "verify", "--manifest", manifest, "--workflows", "i2v", "--dest", dest)
    assert verified.returncode == 0 and "3 of 3 files ok" in verified.stdout


def test_a_byte_flipped_on_the_cdn_is_a_sha256_error_naming_the_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add(sha(LORA))
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                      "--dest", dest)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert failed[0].startswith("FAILED  loras/lora.safetensors: org/loras@main lora.safetensors: sha256 mismatch")
    assert f"the Hub says {sha(LORA)}" in failed[0]
    assert not (dest / "loras" / "lora.safetensors").exists()
    _nothing_left_behind(dest)
    # The other files are in place and locked; the bad one is not in the lock.
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == BIG
    assert set(_lock(dest)) == {"big", "vae"}


def test_a_connection_lost_mid_file_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    # Larger than huggingface_hub's 10 MiB read size, so whole chunks are on disk when the line drops.
    huge = os.urandom(25 << 20)
    hub.add("org/wan", BIG_PATH, huge)
    cut = 15 << 20
    hub.drop_after[sha(huge)] = cut
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                      "--dest", dest)
    assert result.returncode == 0, result.stderr
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == huge
    ranges = [r.headers.get("range") for r in hub.seen("GET", f"/{sha(huge)}")]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut
    assert _lock(dest)["big"]["size"] == len(huge)
    _nothing_left_behind(dest)


def test_locked_downloads_the_locked_commit_and_refuses_one_that_is_gone(hub: FakeHub, tmp_path: Path) -> None:
    manifest, first = _manifest(tmp_path), tmp_path / "first" / "models"
    made = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                    "--dest", first)
    assert made.returncode == 0, made.stderr
    committed = tmp_path / "weights.lock.json"
    committed.write_text((first / "weights.lock.json").read_text())
    locked_commit = hub.commit("org/wan")

    # Upstream moves on: main now has other bytes at the same path.
    newer = os.urandom(len(BIG))
    hub.add("org/wan", BIG_PATH, newer)
    second = tmp_path / "second" / "models"
    same = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                    "--locked", committed, "--dest", second)
    assert same.returncode == 0, same.stderr
    assert (second / "diffusion_models" / "big.safetensors").read_bytes() == BIG
    assert _lock(second)["big"]["commit"] == locked_commit

    # The repo is replaced in place (history rewritten): the locked commit is gone.
    hub.rewrite_history("org/wan")
    third = tmp_path / "third" / "models"
    fetched = len(hub.seen("GET", "/repos/"))
    refused = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                       "--locked", committed, "--dest", third)
    assert refused.returncode == 1
    assert f"revision {locked_commit} not found in org/wan" in refused.stderr
    assert len(hub.seen("GET", "/repos/")) == fetched
    assert not (third / "diffusion_models").exists() and not (third / "vae").exists()

    # Without --locked the same manifest takes what main has now, and says so in the lock.
    fresh = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                     "--dest", third)
    assert fresh.returncode == 0, fresh.stderr
    assert _lock(third)["big"]["sha256"] == sha(newer)
    # verify against the committed lock names the file that drifted.
    drift = _builder(hub, "verify", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                     "--lock", committed, "--dest", third)
    assert drift.returncode == 1
    assert "sha256 mismatch  diffusion_models/big.safetensors" in drift.stdout


def test_locked_refuses_a_lock_made_for_another_manifest(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    made = _builder(hub, "download", "--manifest", _manifest(tmp_path), "--workflows", "i2v", "--presets",
                    "quality", "--dest", dest)
    assert made.returncode == 0, made.stderr
    moved = _manifest(tmp_path, vae={"revision": "v2"})
    refused = _builder(hub, "download", "--manifest", moved, "--workflows", "i2v", "--presets", "quality",
                       "--locked", dest / "weights.lock.json", "--dest", tmp_path / "other")
    assert refused.returncode == 2
    assert "vae: the lock has org/wan@main" in refused.stderr and "the manifest org/wan@v2" in refused.stderr


def test_locked_takes_a_small_git_file_whose_hash_only_the_bytes_give(hub: FakeHub, tmp_path: Path) -> None:
    # Files kept in git (not LFS) have no sha256 from the Hub: the lock's is the bytes'.
    hub.add("org/loras", "config.json", b'{"rank": 128}')
    manifest = _manifest(tmp_path, cfg={"repo": "org/loras", "path": "config.json", "folder": "loras"})
    first, second = tmp_path / "a" / "models", tmp_path / "b" / "models"
    made = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                    "--dest", first)
    assert made.returncode == 0, made.stderr
    assert _lock(first)["cfg"]["sha256"] == sha(b'{"rank": 128}')
    again = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                     "--locked", first / "weights.lock.json", "--dest", second)
    assert again.returncode == 0, again.stderr
    assert (second / "loras" / "config.json").read_bytes() == b'{"rank": 128}'


def test_a_gated_repo_without_token_names_hf_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("org/gated", "g.safetensors", b"g" * 1000, gated=True)
    hub.tokens.add(TOKEN)
    manifest = _manifest(tmp_path, lora={"repo": "org/gated", "path": "g.safetensors"})
    dest = tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                      "--dest", dest, token=None)
    assert result.returncode == 1
    assert f"org/gated is gated: accept its terms at {hub.url}/org/gated, then set HF_TOKEN" in result.stderr
    assert (dest / "vae" / "vae.safetensors").read_bytes() == VAE

    no_access = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                         "--dest", dest, token="hf_someone_else")
    assert no_access.returncode == 1
    assert "org/gated is gated and the token in HF_TOKEN has no access" in no_access.stderr

    with_token = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                          "--dest", dest)
    assert with_token.returncode == 0, with_token.stderr
    assert (dest / "loras" / "g.safetensors").read_bytes() == b"g" * 1000


def test_missing_files_and_revisions_are_reported_with_repo_and_path(hub: FakeHub, tmp_path: Path) -> None:
    manifest = _manifest(
        tmp_path,
        gone={"repo": "org/wan", "path": "split_files/loras/gone.safetensors", "folder": "loras"},
        branch={"repo": "org/loras", "path": "other.safetensors", "revision": "no-such-branch"},
        nothere={"repo": "org/nothere", "path": "x.safetensors"},
    )
    dest = tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "fast",
                      "--dest", dest)
    assert result.returncode == 1
    failed = {line.split()[1]: line for line in result.stderr.splitlines() if line.startswith("FAILED")}
    assert "no such file in org/wan at main" in failed["loras/gone.safetensors:"]
    assert "revision no-such-branch not found in org/loras" in failed["loras/other.safetensors:"]
    assert "repository org/nothere not found" in failed["loras/x.safetensors:"]
    assert (dest / "diffusion_models" / "big.safetensors").read_bytes() == BIG


def test_a_file_already_in_place_without_a_lock_is_adopted_when_its_hash_matches(hub: FakeHub,
                                                                                  tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    (dest / "diffusion_models").mkdir(parents=True)
    (dest / "diffusion_models" / "big.safetensors").write_bytes(BIG)
    (dest / "vae").mkdir()
    (dest / "vae" / "vae.safetensors").write_bytes(b"v" * len(VAE))  # right size, wrong bytes
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "i2v", "--presets", "quality",
                      "--dest", dest)
    assert result.returncode == 0, result.stderr
    assert "adopted diffusion_models/big.safetensors" in result.stderr
    assert not hub.seen("GET", f"/{sha(BIG)}")
    assert (dest / "vae" / "vae.safetensors").read_bytes() == VAE
    assert _lock(dest)["big"]["sha256"] == sha(BIG)


def test_chat_model_is_fetched_as_a_snapshot(hub: FakeHub, tmp_path: Path) -> None:
    manifest, dest = _manifest(tmp_path), tmp_path / "models"
    result = _builder(hub, "download", "--manifest", manifest, "--workflows", "none", "--chat-model",
                      "org/chat@main", "--dest", dest)
    assert result.returncode == 0, result.stderr
    snapshot = dest / "llm" / "org" / "chat"
    assert json.loads((snapshot / "config.json").read_text()) == {"model_type": "mistral"}
    assert (snapshot / "model.safetensors").stat().st_size == 20_000
