"""The model manifest agrees with the graphs and the official templates, and the worker
refuses, before queuing, a job whose weights are not on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diffbox import model_lock
from diffbox.errors import JobError
from diffbox.workflows import NAMED, check_models, manifest, parse
from diffbox.workflows.graph import WORKFLOWS_DIR
from tests.unit.references import kj_svi_recipe, official
from tests.unit.workflow_cases import CASES, model_set, plan_of

# The input naming a model file, and the ComfyUI folder it is looked up in, per loader class.
LOADERS = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
           "VAELoader": ("vae_name", "vae"), "LoraLoaderModelOnly": ("lora_name", "loras")}
OFFICIAL = {"i2v": "video_wan2_2_14B_i2v.json", "qwen_edit:2511": "image_qwen_image_edit_2511.json",
            "qwen_edit:2509": "image_qwen_image_edit_2509.json"}


def graph_models(graph: dict[str, Any]) -> set[tuple[str, str]]:
    return {(node["inputs"][LOADERS[node["class_type"]][0]], LOADERS[node["class_type"]][1])
            for node in graph.values() if node["class_type"] in LOADERS}


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[c for c, _ in CASES])
def test_manifest_lists_exactly_the_files_each_graph_loads(case: str, payload: dict[str, Any]) -> None:
    required = manifest.load().required(*model_set(payload))
    assert {(f.name, f.folder) for f in required} == graph_models(plan_of(payload).graph)


def test_manifest_has_the_shape_the_builder_reads() -> None:
    data = json.loads((WORKFLOWS_DIR / "models.json").read_text())
    for key, entry in data["files"].items():
        assert set(entry) == {"repo", "revision", "path", "folder", "size"}, key
        assert isinstance(entry["size"], int) and entry["size"] > 0
    used = {key for presets in data["workflows"].values() for keys in presets.values() for key in keys}
    assert used == set(data["files"])
    assert set(data["workflows"]) == {"i2v", "svi", "qwen_edit:2511", "qwen_edit:2509"}
    assert all(set(presets) == {"fast", "quality"} for presets in data["workflows"].values())
    pins = json.loads((WORKFLOWS_DIR / "comfyui.json").read_text())
    assert len(pins["comfyui"]["commit"]) == 40
    assert [(n["name"], len(n["commit"])) for n in pins["custom_nodes"]] == [("ComfyUI-KJNodes", 40)]


@pytest.mark.parametrize("model_set_name", sorted(OFFICIAL))
def test_manifest_sources_match_the_official_templates(model_set_name: str) -> None:
    urls = official(OFFICIAL[model_set_name], lightning=True).model_files()
    for f in manifest.load().required(model_set_name, "fast"):
        url = urls[f.name]
        if f.key == "qwen_25_vl_7b_fp8" and "HunyuanVideo" in url:
            continue  # the 2511 template links the same file in another repo (workflows/README.md)
        assert url == f"https://huggingface.co/{f.repo}/resolve/main/{f.path}"


def test_manifest_has_the_svi_examples_loras() -> None:
    # The example names its files only (its LoRA nodes' `properties.models` are stale links
    # copied from the Comfy-Org template); workflows/README.md says where each path was seen.
    loras = {name for chain in kj_svi_recipe()["loras"].values() for name, _ in chain}
    svi = {f.name: f for f in manifest.load().required("svi", "fast") if f.folder == "loras"}
    assert set(svi) == loras
    assert {f.repo for f in svi.values()} == {"Kijai/WanVideo_comfy"}


def _place_all(model_set: str, preset: str, models_dir: Path, size: int = 0) -> None:
    for f in manifest.load().required(model_set, preset):
        f.local_path(models_dir).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(models_dir).write_bytes(b"w" * size)


def test_missing_files_are_named_with_their_folders_and_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        manifest.check_on_disk("i2v", "fast", tmp_path)
    error = caught.value
    assert error.type == "backend"
    assert error.message.startswith(f"model files for i2v:fast missing or not as weights.lock.json records under "
                                    f"{tmp_path} (DIFFBOX_MODELS_DIR): ")
    assert "diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors (missing)" in error.message
    assert "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors (missing)" in error.message
    command = f"python -m builder download --workflows i2v --presets fast --dest {tmp_path}"
    assert error.message.endswith(f"Fetch them with: {command}")
    assert error.details["fetch"] == command
    assert len(error.details["files"]) == 6

    _place_all("i2v", "quality", tmp_path)
    manifest.check_on_disk("i2v", "quality", tmp_path)  # no lock: presence is all that is checked
    with pytest.raises(JobError) as caught:
        manifest.check_on_disk("i2v", "fast", tmp_path)
    assert [(m["file"], m["problem"]) for m in caught.value.details["files"]] == [
        ("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", "missing"),
        ("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", "missing")]


def test_files_that_differ_from_the_lock_are_refused_by_size(tmp_path: Path) -> None:
    required = manifest.load().required("svi", "quality")
    _place_all("svi", "quality", tmp_path, size=5)

    def entry(f: manifest.ModelFile, size: int, repo: str | None = None) -> model_lock.LockedFile:
        return model_lock.LockedFile(repo=repo or f.repo, path=f.path, folder=f.folder, revision=f.revision,
                                     commit="c" * 40, size=size, sha256="0" * 64, fetched_at="2026-01-01T00:00:00Z")

    lock = model_lock.WeightsLock(files={f.key: entry(f, 5) for f in required})
    model_lock.write(tmp_path / model_lock.LOCK_NAME, lock)
    manifest.check_on_disk("svi", "quality", tmp_path)

    high, low = required[0], required[-1]
    lock.files[high.key] = entry(high, 14_000)
    lock.files[low.key] = entry(low, 5, repo="someone/else")
    model_lock.write(tmp_path / model_lock.LOCK_NAME, lock)
    with pytest.raises(JobError) as caught:
        manifest.check_on_disk("svi", "quality", tmp_path)
    assert f"{high.folder}/{high.name} (5 bytes, the lock says 14000)" in caught.value.message
    assert f"{low.folder}/{low.name} (the lock records someone/else/{low.path}" in caught.value.message
    assert "--workflows svi --presets quality" in caught.value.message
    assert caught.value.details["lock"] == str(tmp_path / model_lock.LOCK_NAME)

    (tmp_path / model_lock.LOCK_NAME).write_text("not json")
    with pytest.raises(JobError, match=r"the weights lock can't be read: .*weights\.lock\.json: not a weights lock"):
        manifest.check_on_disk("svi", "quality", tmp_path)


def test_check_models_uses_the_request_model_set(tmp_path: Path) -> None:
    workflow, request = parse({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "model": "2509"})
    with pytest.raises(JobError, match=r"model files for qwen_edit:2509:fast missing"):
        check_models(workflow, request, tmp_path)
    assert all(w.models is not None for w in NAMED.values() if w.name in ("i2v", "svi", "qwen_edit"))
