"""The model manifest agrees with the graphs and the official templates, and the worker
refuses, before queuing, a job whose weights are not on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
        assert set(entry) == {"repo", "revision", "path", "folder", "size", "sha256"}, key
        # None where no public source gave a size (workflows/README.md)
        assert entry["size"] is None or (isinstance(entry["size"], int) and entry["size"] > 0)
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


def test_missing_files_are_named_with_their_folders(tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        manifest.check_present("i2v", "fast", tmp_path)
    error = caught.value
    assert error.type == "backend"
    assert error.message.startswith(f"missing model files for i2v:fast under {tmp_path}")
    assert "diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors" in error.message
    assert "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors" in error.message
    assert len(error.details["missing"]) == 6

    for f in manifest.load().required("i2v", "quality"):
        f.local_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(tmp_path).touch()
    manifest.check_present("i2v", "quality", tmp_path)
    with pytest.raises(JobError) as caught:
        manifest.check_present("i2v", "fast", tmp_path)
    assert [m["file"] for m in caught.value.details["missing"]] == [
        "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
        "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"]


def test_check_models_uses_the_request_model_set(tmp_path: Path) -> None:
    workflow, request = parse({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "model": "2509"})
    with pytest.raises(JobError, match=r"missing model files for qwen_edit:2509:fast"):
        check_models(workflow, request, tmp_path)
    assert all(w.models is not None for w in NAMED.values() if w.name in ("i2v", "svi", "qwen_edit"))
