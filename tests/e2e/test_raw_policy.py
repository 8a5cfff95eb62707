"""Raw graphs switched off (DIFFBOX_ALLOW_RAW_WORKFLOWS=0) or limited to an allow-list of node
classes (DIFFBOX_RAW_NODE_ALLOWLIST), end to end through handler.py and the runpod SDK's local
API against the fake ComfyUI: refused graphs name the rule and cost ComfyUI nothing, what the
rule allows still runs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from diffbox.workflows import manifest
from tests.conftest import TEST_INPUT, ComfyTarget, RunpodApi, job_error, start_runpod_api, worker_env
from tests.jobkit import INVERT_GRAPH, invert_job, is_inversion_of, job_files, png_b64, queue_ids

IMAGE = png_b64((250, 120, 0))


@pytest.fixture(scope="module")
def comfy(fake_comfyui: ComfyTarget) -> ComfyTarget:
    """The fake with a placeholder for every weight, so typed workflows run on it."""
    assert fake_comfyui.base_dir is not None
    for f in manifest.load().files.values():
        path = f.local_path(fake_comfyui.base_dir / "models")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return fake_comfyui


def _api(comfy: ComfyTarget, tmp: Path, **env: str) -> Iterator[RunpodApi]:
    api = start_runpod_api(worker_env(comfy, tmp / "work", **env), tmp / "handler.log")
    yield api
    api.stop()


@pytest.fixture(scope="module")
def no_raw(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    yield from _api(comfy, tmp_path_factory.mktemp("no-raw"), DIFFBOX_ALLOW_RAW_WORKFLOWS="0")


@pytest.fixture(scope="module")
def allow_list(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    yield from _api(comfy, tmp_path_factory.mktemp("allow-list"),
                    DIFFBOX_RAW_NODE_ALLOWLIST="LoadImage, ImageInvert,SaveImage")


def history_ids(url: str) -> set[str]:
    return set(requests.get(f"{url}/history", timeout=5).json())


def refused(api: RunpodApi, comfy: ComfyTarget, job_input: dict[str, Any]) -> dict[str, Any]:
    """The job's error; and it left nothing in ComfyUI (no upload, no prompt, no history)."""
    history = history_ids(comfy.url)
    body = api.runsync(job_input)
    error = job_error(body)
    assert error["type"] == "validation", error
    # No entry of its own (an earlier job's may still be going: they are dropped after the result).
    assert queue_ids(comfy.url) == ([], []) and history_ids(comfy.url) <= history
    assert job_files(comfy, body["id"]) == []
    return error


def test_raw_graphs_switched_off_are_refused_while_typed_workflows_run(no_raw: RunpodApi, comfy: ComfyTarget) -> None:
    for job in (TEST_INPUT["input"], invert_job(IMAGE), {"workflow": {"1": {"class_type": "Anything"}}}):
        error = refused(no_raw, comfy, job)
        assert error["message"] == "workflow: 'raw' is not served by this endpoint"
    body = no_raw.runsync({"workflow": "qwen_edit", "images": [IMAGE], "prompt": "make it blue", "width": 256,
                           "height": 256, "seed": 3})
    assert body["status"] == "COMPLETED", body
    [edited] = body["output"]["outputs"]
    assert Image.open(io.BytesIO(base64.b64decode(edited["data"]))).size == (256, 256)


def test_only_allowed_node_classes_run(allow_list: RunpodApi, comfy: ComfyTarget) -> None:
    body = allow_list.runsync(invert_job(IMAGE))
    assert body["status"] == "COMPLETED", body
    assert is_inversion_of(body["output"]["images"][0]["data"], IMAGE)

    # test_input.json also makes a video: RepeatImageBatch is the first class outside the list.
    error = refused(allow_list, comfy, TEST_INPUT["input"])
    assert error["message"] == "workflow.4: node class RepeatImageBatch is not allowed on this endpoint"
    # A class that could read or write outside the job (or run code) is refused by name, wherever it is.
    for node_class in ("LoadImageOutput", "SaveImageWebsocket", "PythonEval"):
        graph = {**INVERT_GRAPH, "9": {"class_type": node_class, "inputs": {}}}
        error = refused(allow_list, comfy, {**invert_job(IMAGE), "workflow": graph})
        assert error["message"] == f"workflow.9: node class {node_class} is not allowed on this endpoint"
    # Typed workflows are not raw graphs: the list does not apply to them.
    body = allow_list.runsync({"workflow": "qwen_edit", "images": [IMAGE], "prompt": "p", "width": 256,
                               "height": 256})
    assert body["status"] == "COMPLETED", body
