"""Every typed graph passes ComfyUI's own /prompt validation but for its weights.

Runs against the fake ComfyUI, and in the real leg (`--comfyui=real`) against a real one with
KJNodes: there it checks our node classes, input names, types, ranges
and options (KJNodes' `WanImageToVideoSVIPro` and `ImageBatchExtendWithOverlap` included)
against the node schemas themselves. No weights are installed (the module starts a ComfyUI of
its own), so every model file is refused as `value_not_in_list` and nothing runs; each loader
must be refused for that alone.
"""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from diffbox.backends.comfyui import ComfyClient
from diffbox.errors import JobError
from diffbox.inputs.media import InputImage
from diffbox.workflows import parse
from diffbox.workflows.base import JobContext
from tests.conftest import ComfyTarget, free_port
from tests.fakes.comfyui import start_fake_comfyui
from tests.unit.workflow_cases import CASES

# The input that names a weight file, per loader class.
MODEL_INPUTS = {"UNETLoader": "unet_name", "CLIPLoader": "clip_name", "VAELoader": "vae_name",
                "LoraLoaderModelOnly": "lora_name"}
# ComfyUI before PR #11340 (0.3.64, the release our recordings come from) lacks Qwen Edit 2511's method.
NEWER_OPTIONS = {("FluxKontextMultiReferenceLatentMethod", "reference_latents_method"): "index_timestep_zero"}


def _png_loader(value: str, field: str) -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "PNG")
    return InputImage(data=buffer.getvalue(), extension="png", width=64, height=48)


def _options(comfyui: ComfyTarget, class_type: str, name: str) -> list[Any]:
    info = requests.get(f"{comfyui.url}/object_info/{class_type}", timeout=30).json()[class_type]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}[name]
    return list(spec[0] if isinstance(spec[0], list) else spec[1].get("options", []))


def _expected_refusal(comfyui: ComfyTarget, node: dict[str, Any], error: dict[str, Any]) -> bool:
    name = error.get("extra_info", {}).get("input_name")
    if error["type"] != "value_not_in_list":
        return False
    if MODEL_INPUTS.get(node["class_type"]) == name:
        return True
    newer = NEWER_OPTIONS.get((node["class_type"], name))
    return newer is not None and node["inputs"][name] == newer and newer not in _options(
        comfyui, node["class_type"], name)


@pytest.fixture(scope="module")
def comfyui(comfyui: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyTarget]:
    """A ComfyUI of our own with no weights, in place of the session's (where the typed
    workflows' stand-in weights are installed, and a valid graph would run): a fake in the
    fake leg, a second real one in the real leg."""
    base_dir = tmp_path_factory.mktemp("comfyui-no-weights")
    if comfyui.is_fake:
        with start_fake_comfyui(base_dir) as fake:
            yield ComfyTarget(fake.url, base_dir, is_fake=True)
        return
    if comfyui.base_dir is None:  # DIFFBOX_TEST_COMFYUI_URL: a server of someone else's
        yield comfyui
        return
    from tests.realcomfy import installed, start_real_comfyui

    with start_real_comfyui(installed(), base_dir, free_port(), models=False) as real:
        yield ComfyTarget(real.url, base_dir, is_fake=False)


@pytest.mark.parametrize(("case", "payload"), CASES, ids=[c for c, _ in CASES])
def test_comfyui_refuses_each_typed_graph_for_its_missing_weights_only(
        comfyui: ComfyTarget, case: str, payload: dict[str, Any]) -> None:
    workflow, request = parse(payload)
    ctx = JobContext(f"validate-{case}", uuid.uuid4().hex[:8])
    plan = workflow.plan(request, ctx, _png_loader)
    loaders = {i: n for i, n in plan.graph.items() if n["class_type"] in MODEL_INPUTS}
    for node in loaders.values():
        if node["inputs"][MODEL_INPUTS[node["class_type"]]] in _options(comfyui, node["class_type"],
                                                                        MODEL_INPUTS[node["class_type"]]):
            pytest.skip("this ComfyUI has weights installed: a valid graph would run, not only validate")
    client = ComfyClient(comfyui.url)
    try:
        for upload in plan.uploads:
            client.upload_image(upload.name, upload.data, ctx.input_folder)
        with pytest.raises(JobError) as refused:
            client.queue_prompt(plan.graph, "validation-test", str(uuid.uuid4()))
    finally:
        if comfyui.base_dir is not None:
            shutil.rmtree(comfyui.base_dir / "input" / ctx.input_folder, ignore_errors=True)

    node_errors: dict[str, Any] = refused.value.details["node_errors"]
    unexpected = {i: [e for e in v["errors"] if not _expected_refusal(comfyui, plan.graph[i], e)]
                  for i, v in node_errors.items()}
    assert {i: errors for i, errors in unexpected.items() if errors} == {}
    assert set(loaders) <= set(node_errors)  # every loader was checked, and refused for its file alone


def test_an_unknown_node_or_a_wrong_value_is_not_taken_for_a_missing_weight(comfyui: ComfyTarget) -> None:
    """The check above can fail: what is not an absent weight file stays unexpected."""
    workflow, request = parse(CASES[0][1])
    ctx = JobContext("validate-wrong", uuid.uuid4().hex[:8])
    plan = workflow.plan(request, ctx, _png_loader)
    client = ComfyClient(comfyui.url)
    [(wan_id, wan)] = [(i, n) for i, n in plan.graph.items() if n["class_type"] == "WanImageToVideo"]
    try:
        for upload in plan.uploads:
            client.upload_image(upload.name, upload.data, ctx.input_folder)
        wrong = {**plan.graph, wan_id: {**wan, "inputs": {**wan["inputs"], "length": 0}}}
        with pytest.raises(JobError) as refused:
            client.queue_prompt(wrong, "validation-test", str(uuid.uuid4()))
        errors = refused.value.details["node_errors"][wan_id]["errors"]
        assert [e["type"] for e in errors if not _expected_refusal(comfyui, wrong[wan_id], e)] == [
            "value_smaller_than_min"]
        unknown = {**plan.graph, wan_id: {**wan, "class_type": "NoSuchNode"}}
        with pytest.raises(JobError) as refused:
            client.queue_prompt(unknown, "validation-test", str(uuid.uuid4()))
        assert "NoSuchNode" in refused.value.message
    finally:
        if comfyui.base_dir is not None:
            shutil.rmtree(comfyui.base_dir / "input" / ctx.input_folder, ignore_errors=True)
