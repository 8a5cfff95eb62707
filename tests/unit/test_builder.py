"""The builder's plan, verify and paths, and the worker's use of the same models layout."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder import BuildError, weights
from builder.__main__ import main
from diffbox import model_lock
from diffbox.backends.comfyui_server import ComfyServer
from diffbox.config import Settings
from diffbox.model_lock import LockedFile, WeightsLock
from diffbox.model_paths import COMFY_FOLDERS, CONFIG_NAME
from diffbox.workflows import manifest as manifest_module


def _file(repo: str, path: str, folder: str, size: int) -> dict[str, Any]:
    return {"repo": repo, "revision": "abc123", "path": path, "folder": folder, "size": size}


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    files = {
        "unet": _file("org/wan", "split/diffusion_models/unet.safetensors", "diffusion_models", 1000),
        "te": _file("org/wan", "split/text_encoders/te.safetensors", "text_encoders", 200),
        "vae": _file("org/wan", "split/vae/vae.safetensors", "vae", 30),
        "lora": _file("org/lora", "lora.safetensors", "loras", 4),
        "edit11": _file("org/edit", "e11.safetensors", "diffusion_models", 50_000),
        "edit09": _file("org/edit", "e09.safetensors", "diffusion_models", 60_000),
        "edit_lora": _file("org/edit", "l.safetensors", "loras", 5),
    }
    data = {"files": files, "workflows": {
        "i2v": {"fast": ["unet", "te", "vae", "lora"], "quality": ["unet", "te", "vae"]},
        "qwen_edit:2511": {"fast": ["edit11", "te", "vae", "edit_lora"], "quality": ["edit11", "te", "vae"]},
        "qwen_edit:2509": {"fast": ["edit09", "te", "vae"], "quality": ["edit09", "te", "vae"]},
    }}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    return path


def _plan(capsys: pytest.CaptureFixture[str], manifest: Path, *args: str) -> dict[str, Any]:
    assert main(["plan", "--manifest", str(manifest), "--json", *args]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_plan_lists_each_file_once_with_the_total(small_manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(capsys, small_manifest, "--workflows", "i2v,qwen_edit", "--presets", "fast")
    # qwen_edit means both variants; te and vae are shared and counted once.
    assert [f["key"] for f in plan["files"]] == ["unet", "te", "vae", "lora", "edit11", "edit_lora", "edit09"]
    assert plan["total_bytes_estimate"] == 1000 + 200 + 30 + 4 + 50_000 + 5 + 60_000
    assert plan["files"][0] == {"key": "unet", "repo": "org/wan", "revision": "abc123",
                                "path": "split/diffusion_models/unet.safetensors", "folder": "diffusion_models",
                                "size_estimate": 1000}

    one = _plan(capsys, small_manifest, "--workflows", "qwen_edit:2511", "--presets", "quality")
    assert one["total_bytes_estimate"] == 50_000 + 200 + 30
    assert _plan(capsys, small_manifest, "--workflows", "none")["files"] == []

    assert main(["plan", "--manifest", str(small_manifest), "--workflows", "i2v", "--presets", "fast"]) == 0
    table = capsys.readouterr().out
    assert "split/vae/vae.safetensors" in table and "4 files, about 1.2 kB (1234 bytes, estimated;" in table


def test_plan_refuses_unknown_workflows_and_presets(small_manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifest", str(small_manifest), "--workflows", "t2v"]) == 2
    assert "unknown workflow 't2v'; the manifest has i2v, qwen_edit:2511, qwen_edit:2509" in capsys.readouterr().err
    assert main(["plan", "--manifest", str(small_manifest), "--workflows", "i2v", "--presets", "turbo"]) == 2
    assert "i2v has no preset 'turbo'" in capsys.readouterr().err


def test_two_entries_landing_on_one_file_are_refused(tmp_path: Path) -> None:
    data = {"files": {"a": _file("org/a", "x/m.safetensors", "loras", 1),
                      "b": _file("org/b", "y/m.safetensors", "loras", 2)},
            "workflows": {"i2v": {"fast": ["a", "b"]}}}
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match=re.escape("'a' and 'b' both land at loras/m.safetensors")):
        weights.select(manifest_module.load(tmp_path / "m.json"), ["i2v"], None)


def test_the_real_manifest_plans_every_workflow(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_module.load()
    plan = _plan(capsys, Path(manifest_module.__file__).parents[2] / "workflows" / "models.json")
    assert {f["key"] for f in plan["files"]} == set(manifest.files)
    for f in manifest.files.values():
        assert f.folder in COMFY_FOLDERS, f
        assert f.size > 0


def test_paths_writes_a_yaml_naming_every_manifest_folder(small_manifest: Path, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    (dest / "upscalers_custom").mkdir(parents=True)
    assert main(["paths", "--manifest", str(small_manifest), "--dest", str(dest)]) == 0
    config = yaml.safe_load((dest / CONFIG_NAME).read_text())
    group = config["diffbox"]
    assert group["base_path"] == str(dest)
    assert group["is_default"] is True
    used = {f.folder for f in manifest_module.load(small_manifest).files.values()}
    assert used <= set(group)
    # A folder someone added by hand is listed too.
    assert group["upscalers_custom"] == "upscalers_custom/"
    assert all(group[name] == f"{name}/" for name in used)


def _place(dest: Path, folder: str, name: str, data: bytes) -> None:
    (dest / folder).mkdir(parents=True, exist_ok=True)
    (dest / folder / name).write_bytes(data)


def _locked(f: dict[str, Any], data: bytes) -> LockedFile:
    return LockedFile(repo=f["repo"], path=f["path"], folder=f["folder"], revision=f["revision"], commit="c" * 40,
                      size=len(data), sha256=hashlib.sha256(data).hexdigest(), fetched_at="2026-01-01T00:00:00Z")


def test_verify_checks_each_file_against_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad, short = b"g" * 10, b"b" * 20, b"s" * 30
    files = {
        "good": _file("o/r", "a/good.safetensors", "vae", 11),  # the manifest's size is an estimate
        "corrupt": _file("o/r", "a/corrupt.safetensors", "vae", 20),
        "short": _file("o/r", "a/short.safetensors", "loras", 30),
        "gone": _file("o/r", "a/gone.safetensors", "loras", 40),
        "unlocked": _file("o/r", "a/unlocked.safetensors", "loras", 40),
        "moved": _file("o/r", "a/moved.safetensors", "loras", 40),
    }
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"files": files, "workflows": {"i2v": {"fast": list(files)}}}))
    lock = WeightsLock(files={"good": _locked(files["good"], good), "corrupt": _locked(files["corrupt"], bad),
                              "short": _locked(files["short"], short), "gone": _locked(files["gone"], b"x"),
                              "moved": _locked({**files["moved"], "revision": "v1"}, b"m")})
    dest = tmp_path / "models"
    model_lock.write(dest / model_lock.LOCK_NAME, lock)
    _place(dest, "vae", "good.safetensors", good)
    _place(dest, "vae", "corrupt.safetensors", b"x" * 20)
    _place(dest, "loras", "short.safetensors", b"s" * 3)
    _place(dest, "loras", "unlocked.safetensors", b"u")
    _place(dest, "loras", "moved.safetensors", b"m")

    selected = list(manifest_module.load(manifest).files.values())
    checks = {c.file.key: c for c in weights.verify(selected, dest, lock)}
    assert {k: c.status for k, c in checks.items()} == {
        "good": "ok", "corrupt": "sha256 mismatch", "short": "wrong size", "gone": "missing",
        "unlocked": "not locked", "moved": "lock differs"}
    assert checks["short"].actual_size == 3
    assert checks["moved"].detail == "locked o/r@v1 a/moved.safetensors"

    assert main(["verify", "--manifest", str(manifest), "--dest", str(dest)]) == 1
    out = capsys.readouterr().out
    assert "sha256 mismatch  vae/corrupt.safetensors" in out
    assert "1 of 6 files ok" in out
    assert main(["verify", "--manifest", str(manifest), "--dest", str(dest), "--no-hash"]) == 1
    assert "2 of 6 files ok" in capsys.readouterr().out
    (dest / model_lock.LOCK_NAME).write_text("{}}")
    assert main(["verify", "--manifest", str(manifest), "--dest", str(dest)]) == 2
    assert f"{dest / model_lock.LOCK_NAME}: not a weights lock" in capsys.readouterr().err


def test_chat_model_reference_parses() -> None:
    assert weights.parse_repo_ref("org/model@0123abc") == ("org/model", "0123abc")
    assert weights.parse_repo_ref("org/model") == ("org/model", "main")
    with pytest.raises(BuildError):
        weights.parse_repo_ref("model")


def test_worker_points_comfyui_at_the_models_dir_when_it_exists(tmp_path: Path) -> None:
    models, work = tmp_path / "models", tmp_path / "work"
    settings = Settings(comfyui_dir=tmp_path / "ComfyUI", models_dir=models, work_dir=work, comfyui_args=["--cpu"])
    argv = _argv(ComfyServer(settings))
    assert "--extra-model-paths-config" not in argv

    (models / "loras").mkdir(parents=True)
    argv = _argv(ComfyServer(settings))
    config = Path(argv[argv.index("--extra-model-paths-config") + 1])
    assert config == work / CONFIG_NAME
    group = yaml.safe_load(config.read_text())["diffbox"]
    assert group["base_path"] == str(models)
    assert {"loras", "diffusion_models", "text_encoders", "vae"} <= set(group)


def _argv(server: ComfyServer) -> list[str]:
    process = server.supervisor.process
    assert process is not None
    return process.argv


def test_the_disk_space_check_counts_what_the_hub_reports(tmp_path: Path) -> None:
    f = manifest_module.ModelFile("unet", "org/wan", "main", "split/unet.safetensors", "diffusion_models", 1)
    fits = weights._Job(f, "main", None, remote=weights.Remote("c" * 40, 1000, None))
    weights._check_space([fits], tmp_path)
    huge = weights._Job(f, "main", None, remote=weights.Remote("c" * 40, 10**18, None))
    with pytest.raises(BuildError, match=r"free; the files to fetch need 1000000\.0 TB \(1000000000000001000 bytes"):
        weights._check_space([fits, huge], tmp_path)
