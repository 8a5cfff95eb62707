"""The graphs requests become: the official templates' node classes, wiring and preset
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
from tests.unit.official_templates import (
    KSAMPLER_ADVANCED_WIDGETS,
    KSAMPLER_WIDGETS,
    official,
    our_model_chain,
    our_model_nodes,
)
from tests.unit.workflow_cases import CASES, by_class, model_set, plan_of, titled

WAN_TEMPLATE = "video_wan2_2_14B_i2v.json"
# Where our graphs differ from the official templates on purpose (see workflows/README.md).
QWEN_SWAPS = {"FluxKontextImageScale": "ImageScale", "SaveImageAdvanced": "SaveImage"}


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[c for c, _ in CASES])
def test_every_graph_is_well_formed_and_writes_to_the_job_folder(case: str, payload: dict[str, Any]) -> None:
    graph = plan_of(payload).graph
    check_graph(graph)  # links resolve, no cycles
    saves = [n for n in graph.values() if n["class_type"] in ("SaveVideo", "SaveImage")]
    assert saves and all(n["inputs"]["filename_prefix"].startswith("diffbox/job-1/") for n in saves)
    assert all(n["inputs"]["image"].startswith("diffbox/job-1/") for n in by_class(graph, "LoadImage"))


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
    for upload in plan.uploads:
        path = Path(comfy_schemas.paths.input, "diffbox", "job-1", upload.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(upload.data)
    valid, error, outputs, node_errors = validate_prompt(comfy_schemas, copy.deepcopy(plan.graph))
    assert (valid, error, node_errors) == (True, None, {})
    assert sorted(outputs) == sorted(i for i, n in plan.graph.items() if n["class_type"].startswith("Save"))
    assert model_set(payload)  # every typed workflow names its weights


@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_i2v_matches_the_official_template(preset: str) -> None:
    ref = official(WAN_TEMPLATE, lightning=preset == "fast")
    graph = plan_of({"workflow": "i2v", "image": "x", "prompt": "p", "preset": preset, "seed": 1}).graph
    ours = {n["class_type"] for n in graph.values()}
    assert ours == ref.classes() - ({"LoraLoaderModelOnly"} if preset == "quality" else set())

    ref_samplers = sorted(ref.of_class("KSamplerAdvanced"), key=lambda n: ref.widget(n, KSAMPLER_ADVANCED_WIDGETS,
                                                                                     "start_at_step"))
    our_samplers = [titled(graph, "sampler_high"), titled(graph, "sampler_low")]
    for theirs, mine in zip(ref_samplers, our_samplers, strict=True):
        for name in KSAMPLER_ADVANCED_WIDGETS:
            if name not in ("control", "noise_seed"):
                assert mine["inputs"][name] == ref.widget(theirs, KSAMPLER_ADVANCED_WIDGETS, name), name
        assert our_model_chain(graph, mine) == ref.model_chain(theirs)

    [shift] = {round(n["widgets_values"][0], 6) for n in ref.of_class("ModelSamplingSD3")}
    assert {n["inputs"]["shift"] for n in by_class(graph, "ModelSamplingSD3")} == {shift}
    [clip] = ref.of_class("CLIPLoader")
    assert titled(graph, "clip")["inputs"]["type"] == clip["widgets_values"][1]
    [create] = ref.of_class("CreateVideo")
    assert titled(graph, "create_video")["inputs"]["fps"] == ref.widget(create, ["images", "fps"], "fps")
    assert titled(graph, "image_to_video")["inputs"]["batch_size"] == 1
    assert titled(graph, "save")["inputs"]["format"] == "mp4" and titled(graph, "save")["inputs"]["codec"] == "h264"
    assert titled(graph, "negative")["inputs"]["text"] == ref.of_class("CLIPTextEncode")[0]["widgets_values"][0]


@pytest.mark.parametrize("model", ["2511", "2509"])
@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_qwen_edit_matches_the_official_template(model: str, preset: str) -> None:
    ref = official(f"image_qwen_image_edit_{model}.json", lightning=preset == "fast")
    graph = plan_of({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "model": model,
                     "preset": preset}).graph
    expected = {QWEN_SWAPS.get(c, c) for c in ref.classes()}
    assert {n["class_type"] for n in graph.values()} == expected - (
        {"LoraLoaderModelOnly"} if preset == "quality" else set())

    [theirs], mine = ref.of_class("KSampler"), titled(graph, "sampler")
    for name in ("steps", "cfg", "sampler_name", "scheduler", "denoise"):
        assert mine["inputs"][name] == ref.widget(theirs, KSAMPLER_WIDGETS, name), name
    assert our_model_chain(graph, mine) == ref.model_chain(theirs)
    [aura] = ref.of_class("ModelSamplingAuraFlow")
    assert titled(graph, "shift")["inputs"]["shift"] == pytest.approx(aura["widgets_values"][0])
    [norm] = ref.of_class("CFGNorm")
    assert titled(graph, "cfg_norm")["inputs"]["strength"] == norm["widgets_values"][0]
    [clip] = ref.of_class("CLIPLoader")
    assert titled(graph, "clip")["inputs"]["type"] == clip["widgets_values"][1]
    methods = {n["widgets_values"][0] for n in ref.of_class("FluxKontextMultiReferenceLatentMethod")}
    assert {n["inputs"]["reference_latents_method"] for n in
            by_class(graph, "FluxKontextMultiReferenceLatentMethod")} == methods
    # Both encoders see the (scaled) first image, and the latent starts from it.
    scaled = [titled(graph, "scale") is graph[link[0]] for link in
              (titled(graph, "positive")["inputs"]["image1"], titled(graph, "negative")["inputs"]["image1"],
               titled(graph, "latent")["inputs"]["pixels"])]
    assert all(scaled)


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
    assert graph[conditioning["inputs"]["end_image"][0]]["inputs"]["image"] == "diffbox/job-1/end.png"
    assert graph[conditioning["inputs"]["start_image"][0]]["inputs"]["image"] == "diffbox/job-1/start.png"
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
    # The join drops each later clip's overlap (anchor frame + 4 per motion latent).
    trims = by_class(graph, "ImageFromBatch")
    assert [(t["inputs"]["batch_index"], t["inputs"]["length"]) for t in trims] == [(9, 40), (9, 40)]
    assert len(by_class(graph, "ImageBatch")) == 2
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
        if node["class_type"] == "ImageBatch":
            return order(node["inputs"]["image1"]) + order(node["inputs"]["image2"])
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

