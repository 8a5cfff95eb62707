"""The graphs requests become: equal, setting by setting, to the references the presets follow
(tests/unit/references.py), their wiring and preset
settings, the options (end image, extra images), and the SVI clip chain."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from diffbox.progress import ProgressTracker
from diffbox.workflows import manifest
from diffbox.workflows.raw import check_graph
from tests.fakes.comfyui.validate import Paths, Schemas, validate_prompt
from tests.unit.references import (
    Recipe,
    differences,
    kj_svi_recipe,
    our_model_nodes,
    our_qwen_recipe,
    our_wan_recipe,
    qwen_template_recipe,
    wan_template_recipe,
)
from tests.unit.workflow_cases import CASES, CTX, by_class, content_name, model_set, plan_of, titled, write_uploads


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[c for c, _ in CASES])
def test_every_graph_is_well_formed_and_writes_to_the_job_folder(case: str, payload: dict[str, Any]) -> None:
    graph = plan_of(payload).graph
    check_graph(graph)  # links resolve, no cycles
    saves = [n for n in graph.values() if n["class_type"] in ("SaveVideo", "SaveImage")]
    assert saves and all(n["inputs"]["filename_prefix"].startswith("diffbox/job-1/") for n in saves)
    assert all(n["inputs"]["image"].startswith("diffbox/in/") for n in by_class(graph, "LoadImage"))


@pytest.fixture(scope="module")
def comfy_schemas(tmp_path_factory: pytest.TempPathFactory) -> Schemas:
    """ComfyUI's node schemas (recorded, plus extra_schemas/) on a disk holding every weight."""
    paths = Paths.create(tmp_path_factory.mktemp("comfyui"))
    paths.ensure()
    for f in manifest.load().files.values():
        f.local_path(paths.models).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(paths.models).touch()
    return Schemas(paths)


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[c for c, _ in CASES])
def test_every_graph_passes_comfyui_validation(case: str, payload: dict[str, Any], comfy_schemas: Schemas) -> None:
    plan = plan_of(payload)
    write_uploads(plan, Path(comfy_schemas.paths.input))
    valid, error, outputs, node_errors = validate_prompt(comfy_schemas, copy.deepcopy(plan.graph))
    assert (valid, error, node_errors) == (True, None, {})
    assert sorted(outputs) == sorted(i for i, n in plan.graph.items() if n["class_type"].startswith("Save"))
    assert model_set(payload)  # every typed workflow names its weights


WAN_TEMPLATES = {False: "video_wan2_2_14B_i2v.json", True: "video_wan2_2_14B_flf2v.json"}  # by end_image
WAN_REQUEST = {"image": "x", "seed": 1, "width": 640, "height": 640}  # the references' size
# Where a preset differs from its reference on purpose (workflows/README.md says why), as
# (ours, theirs); node classes as (only ours, only theirs). Everything else must be equal.
SAVE_AUTO = {"save": (("mp4", "h264"), ("auto", "auto"))}
SVI_DIFFERENCES = {
    "classes": ({"UNETLoader", "KSamplerAdvanced", "ImageScale", "CreateVideo", "SaveVideo"},
                {"DiffusionModelLoaderKJ", "SamplerCustomAdvanced", "BasicScheduler", "SplitSigmas", "KSamplerSelect",
                 "RandomNoise", "DisableNoise", "ScheduledCFGGuidance", "ImageResizeKJv2", "VHS_VideoCombine"}),
    "models": ({"unet_high": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                "unet_low": "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
                "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae": "wan_2.1_vae.safetensors"},
               {"unet_high": "Wan2_2-I2V-A14B-HIGH_fp8_e4m3fn_scaled_KJ.safetensors",
                "unet_low": "Wan2_2-I2V-A14B-LOW_fp8_e4m3fn_scaled_KJ.safetensors",
                "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae": "Wan2_1_VAE_bf16.safetensors"}),
}


def _svi_reference(preset: str) -> Recipe:
    reference = kj_svi_recipe()
    if preset == "quality":
        # No published SVI workflow samples without distill LoRAs: the i2v template's quality
        # sampling, on the example's graph without its distill LoRAs.
        sampling = wan_template_recipe(WAN_TEMPLATES[False], lightning=False)
        reference |= {k: sampling[k] for k in ("steps", "split", "cfg", "cfg_low", "shift")}
        reference["loras"] = {k: [lora for lora in v if lora[0].startswith("SVI_")]
                              for k, v in reference["loras"].items()}
    return reference



@pytest.mark.parametrize("end_image", [False, True], ids=["i2v", "flf2v"])
@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_i2v_presets_equal_the_official_templates(preset: str, end_image: bool) -> None:
    request = {"workflow": "i2v", **WAN_REQUEST, "prompt": "p", "preset": preset}
    if end_image:
        request["end_image"] = "y"
    ours = our_wan_recipe(plan_of(request).graph)
    theirs = wan_template_recipe(WAN_TEMPLATES[end_image], lightning=preset == "fast")
    assert differences(ours, theirs) == SAVE_AUTO


@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_svi_presets_equal_kijais_example(preset: str) -> None:
    graph = plan_of({"workflow": "svi", **WAN_REQUEST, "prompts": ["a", "b", "c"], "preset": preset}).graph
    for clip in ("#1", "#3"):
        assert differences(our_wan_recipe(graph, clip), _svi_reference(preset)) == SVI_DIFFERENCES


def test_i2v_and_svi_default_sizes_keep_the_input_aspect() -> None:
    # The references render 640x640 whatever the input; ours default to Wan's 480p pixel count
    # at the input's aspect (a request can still ask for 640x640, as the tests above do).
    request = {"image": "x", "prompt": "p"}
    assert our_wan_recipe(plan_of({"workflow": "i2v", **request}).graph)["size"] == "832x480"
    assert our_wan_recipe(plan_of({"workflow": "svi", **request, "clips": 2}).graph, "#1")["size"] == \
        "832x480 lanczos crop center"


@pytest.mark.parametrize("model", ["2511", "2509"])
@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_qwen_edit_presets_equal_the_official_templates(model: str, preset: str) -> None:
    graph = plan_of({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "model": model, "preset": preset}).graph
    theirs = qwen_template_recipe(model, lightning=preset == "fast")
    # SaveImageAdvanced is newer than the ComfyUI whose schemas we record; SaveImage writes the same PNG.
    expected = {"classes": ({"SaveImage"}, {"SaveImageAdvanced"})} if model == "2509" else {}
    assert differences(our_qwen_recipe(graph), theirs) == expected


def test_qwen_edit_asked_size_scales_with_image_scale() -> None:
    graph = plan_of({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "width": 512, "height": 384}).graph
    assert our_qwen_recipe(graph)["size"] == "ImageScale"
    assert titled(graph, "scale")["inputs"] | {"image": None} == {
        "image": None, "upscale_method": "lanczos", "width": 512, "height": 384, "crop": "center"}
    # Both encoders see the (scaled) first image, and the latent starts from it.
    scale = titled(graph, "scale")
    assert all(scale is graph[link[0]] for link in (
        titled(graph, "positive")["inputs"]["image1"], titled(graph, "negative")["inputs"]["image1"],
        titled(graph, "latent")["inputs"]["pixels"]))


def test_qwen_edit_wires_extra_images_into_both_encoders() -> None:
    graph = plan_of({"workflow": "qwen_edit", "images": ["a", "b", "c"], "prompt": "p",
                     "negative_prompt": "blurry"}).graph
    for title, prompt in (("positive", "p"), ("negative", "blurry")):
        inputs = titled(graph, title)["inputs"]
        assert inputs["prompt"] == prompt
        assert [graph[inputs[f"image{i}"][0]]["_meta"]["title"] for i in (2, 3)] == ["image2", "image3"]
    assert len(by_class(graph, "LoadImage")) == 3


def test_i2v_end_image_uses_first_last_frame() -> None:
    graph = plan_of({"workflow": "i2v", "image": "x", "end_image": "y", "prompt": "p"}).graph
    conditioning = titled(graph, "image_to_video")
    assert conditioning["class_type"] == "WanFirstLastFrameToVideo"
    assert graph[conditioning["inputs"]["end_image"][0]]["inputs"]["image"] == CTX.input_ref(content_name(b"y"))
    assert graph[conditioning["inputs"]["start_image"][0]]["inputs"]["image"] == CTX.input_ref(content_name(b"x"))
    assert not by_class(graph, "WanImageToVideo")


def test_svi_chains_clips_with_their_own_prompt_and_seed() -> None:
    plan = plan_of({"workflow": "svi", "image": "x", "prompts": ["one", "two", "three"], "seed": 100,
                    "motion_latents": 2, "frames_per_clip": 49, "width": 480, "height": 832})
    graph = plan.graph
    assert plan.clips == 3
    anchor = titled(graph, "anchor")
    assert graph[anchor["inputs"]["pixels"][0]]["inputs"] | {"image": None} == {
        "image": None, "upscale_method": "lanczos", "width": 480, "height": 832, "crop": "center"}
    for k, prompt in enumerate(["one", "two", "three"], start=1):
        svi = titled(graph, f"svi#{k}")
        assert graph[svi["inputs"]["positive"][0]]["inputs"]["text"] == prompt
        assert svi["inputs"]["anchor_samples"] == [plan_id(graph, "anchor"), 0]
        assert svi["inputs"]["length"] == 49
        if k == 1:
            assert "prev_samples" not in svi["inputs"] and svi["inputs"]["motion_latent_count"] == 0
        else:
            assert svi["inputs"]["prev_samples"] == [plan_id(graph, f"sampler_low#{k - 1}"), 0]
            assert svi["inputs"]["motion_latent_count"] == 2
        high = titled(graph, f"sampler_high#{k}")
        assert high["inputs"]["noise_seed"] == 99 + k
        assert high["inputs"]["positive"] == [plan_id(graph, f"svi#{k}"), 0]
    # Every clip is a partial output, and progress knows each clip's nodes.
    assert plan.partial_nodes == {plan_id(graph, f"save#{k}"): k for k in (1, 2, 3)}
    assert {plan.node_clip[plan_id(graph, f"sampler_low#{k}")] for k in (1, 2, 3)} == {1, 2, 3}
    # The joins cross-fade each later clip's overlap (anchor frame + 4 per motion latent).
    joins = by_class(graph, "ImageBatchExtendWithOverlap")
    assert [j["inputs"]["overlap"] for j in joins] == [9, 9]
    assert titled(graph, "create_joined")["inputs"]["images"] == [plan_id(graph, "join2_0"), 2]
    joined = titled(graph, "save_joined")
    assert joined["inputs"]["filename_prefix"] == "diffbox/job-1/svi"
    assert plan.settings["frames"] == 49 + 2 * 40


def test_svi_models_add_svi_loras_on_top_of_each_preset() -> None:
    for preset, loras in (("fast", ["lora_high", "svi_lora_high"]), ("quality", ["svi_lora_high"])):
        graph = plan_of({"workflow": "svi", "image": "x", "prompt": "p", "preset": preset}).graph
        chain = [n["_meta"]["title"] for n in our_model_nodes(graph, titled(graph, "sampler_high#1"))]
        assert chain == ["shift_high", *reversed(loras), "unet_high"]


@pytest.mark.parametrize("clips", [2, 3, 4, 5, 7, 20])
def test_svi_join_keeps_clip_order(clips: int) -> None:
    graph = plan_of({"workflow": "svi", "image": "x", "prompt": "p", "clips": clips}).graph

    def order(link: list[Any]) -> list[int]:
        node = graph[link[0]]
        title = node["_meta"]["title"]
        if node["class_type"] == "ImageBatchExtendWithOverlap":
            assert link[1] == 2  # extended_images
            return order(node["inputs"]["source_images"]) + order(node["inputs"]["new_images"])
        assert title.startswith("decode#")
        return [int(title.split("#")[1])]

    root = titled(graph, "create_joined")["inputs"]["images"]
    assert order(root) == list(range(1, clips + 1))


def test_svi_progress_counts_clips_and_steps() -> None:
    plan = plan_of({"workflow": "svi", "image": "x", "prompt": "p", "clips": 3})
    updates: list[dict[str, Any]] = []
    tracker = ProgressTracker(updates.append, interval_s=0)
    tracker.set_graph(plan.graph, plan.node_clip, plan.clips)
    tracker.on_message("execution_start", {})
    tracker.on_message("progress", {"node": plan_id(plan.graph, "sampler_high#2"), "value": 1, "max": 2})
    assert {k: updates[-1][k] for k in ("node", "clip", "clips", "step", "steps")} == {
        "node": "KSamplerAdvanced", "clip": 2, "clips": 3, "step": 1, "steps": 2}


def test_one_svi_clip_is_the_whole_video() -> None:
    plan = plan_of({"workflow": "svi", "image": "x", "prompt": "p"})
    assert plan.partial_nodes == {} and len(by_class(plan.graph, "SaveVideo")) == 1
    assert titled(plan.graph, "save#1")["inputs"]["filename_prefix"] == "diffbox/job-1/svi"


def plan_id(graph: dict[str, Any], title: str) -> str:
    [node_id] = [i for i, n in graph.items() if n["_meta"]["title"] == title]
    return node_id

