"""The schemas the fake ComfyUI serves for the pinned custom nodes' classes (recorded in
tests/fakes/comfyui/object_info.json by `python -m tests.record_object_info`, plus
extra_schemas/) are what a real ComfyUI with those nodes reports: checked in the real leg."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import ComfyTarget
from tests.fakes.comfyui.validate import EXTRA_SCHEMAS_DIR, OBJECT_INFO_PATH, load_extra_schemas

# Nodes of the pinned custom nodes that our graphs use.
CUSTOM = ["WanImageToVideoSVIPro", "ImageBatchExtendWithOverlap"]


def served(node: str) -> dict[str, Any]:
    schemas: dict[str, dict[str, Any]] = json.loads(OBJECT_INFO_PATH.read_text())
    schemas.update(load_extra_schemas(EXTRA_SCHEMAS_DIR))
    return schemas[node]


@pytest.mark.parametrize("node", CUSTOM)
def test_the_pinned_custom_node_reports_the_schema_the_fake_serves(comfyui: ComfyTarget, node: str) -> None:
    if comfyui.is_fake:
        pytest.skip("the fake serves this very schema; only a real ComfyUI can confirm it")
    response = requests.get(f"{comfyui.url}/object_info/{node}", timeout=30)
    response.raise_for_status()
    real = response.json()
    assert node in real, f"{node} is not registered: is the pinned ComfyUI-KJNodes in custom_nodes/?"
    assert real[node] == served(node)
