from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

import pytest
from PIL import Image

from diffbox.errors import JobError
from diffbox.inputs.media import InputImage, decode_image
from diffbox.workflows import parse
from diffbox.workflows.base import JobContext
from diffbox.workflows.raw import MAX_SEED, RawRequest, plan


def _png(size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _load(value: str, field: str) -> InputImage:
    return decode_image(value, field, 10_000_000)


SAMPLER_GRAPH: dict[str, Any] = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
    "2": {"class_type": "KSampler", "inputs": {"seed": -1, "steps": 4}},
    "3": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 7}},
    "4": {"class_type": "RandomNoise", "inputs": {}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../etc/out"}},
    "6": {"class_type": "LoadImage", "inputs": {"image": "not_uploaded.png"}},
}


def test_plan_rewrites_inputs_outputs_and_draws_seeds() -> None:
    _, request = parse({"workflow": SAMPLER_GRAPH, "images": [{"name": "a.png", "image": _png()}]})
    assert isinstance(request, RawRequest)
    result = plan(request, JobContext("job-1"), _load)
    graph = result.graph
    [upload] = result.uploads
    assert upload.name == hashlib.sha256(base64.b64decode(_png())).hexdigest()[:32] + ".png"
    assert graph["1"]["inputs"]["image"] == f"diffbox/in/{upload.name}"  # the same bytes, the same name
    assert graph["6"]["inputs"]["image"] == "not_uploaded.png"  # a file already on the server
    assert graph["5"]["inputs"]["filename_prefix"] == "diffbox/job-1/etc/out"
    drawn = graph["2"]["inputs"]["seed"]
    assert isinstance(drawn, int) and 0 <= drawn < MAX_SEED
    assert graph["3"]["inputs"]["noise_seed"] == 7
    assert isinstance(graph["4"]["inputs"]["noise_seed"], int)
    assert result.settings["seeds"] == {"2": drawn, "3": 7, "4": graph["4"]["inputs"]["noise_seed"]}
    # The caller's graph is left as it was.
    assert SAMPLER_GRAPH["2"]["inputs"]["seed"] == -1


def test_single_seed_is_also_returned_as_seed() -> None:
    graph = {"1": {"class_type": "KSampler", "inputs": {"seed": 5}}}
    _, request = parse({"workflow": graph})
    assert plan(request, JobContext("j"), _load).settings == {"seeds": {"1": 5}, "seed": 5}


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({}, "workflow: the graph has no nodes"),
        ({"1": []}, "workflow.1: a node must be an object"),
        ({"1": {"class_type": "X", "inputs": []}}, "workflow.1.inputs: must be an object"),
        ({"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}},
         "the graph has a cycle"),
        ({"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}, "the graph has a cycle"),
    ],
)
def test_malformed_graphs_are_refused_naming_the_node(graph: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as err:
        parse({"workflow": graph})
    assert err.value.type == "validation"
    assert message in err.value.message


def test_a_long_chain_does_not_overflow_the_cycle_check() -> None:
    graph = {str(i): {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}} for i in range(1, 1999)}
    graph["0"] = {"class_type": "EmptyImage", "inputs": {}}
    parse({"workflow": graph})


@pytest.mark.parametrize("name", ["../a.png", "/etc/passwd", "a/b.png", ".hidden", "..", "a\\b.png"])
def test_image_names_cannot_leave_the_job_folder(name: str) -> None:
    with pytest.raises(JobError) as err:
        parse({"workflow": {"1": {"class_type": "A"}}, "images": [{"name": name, "image": _png()}]})
    assert "images.0.name" in err.value.message


def test_input_must_be_an_object_with_a_workflow() -> None:
    with pytest.raises(JobError, match="input: expected a JSON object"):
        parse(["x"])
    with pytest.raises(JobError, match="workflow: required"):
        parse({"images": []})
