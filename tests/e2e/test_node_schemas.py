"""The node schemas the fake ComfyUI adds to its recording (tests/fakes/comfyui/extra_schemas/)
are what a real ComfyUI with the pinned custom nodes reports: checked when the tests run
against one (DIFFBOX_TEST_COMFYUI_URL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.conftest import ComfyTarget

EXTRA = Path(__file__).parents[1] / "fakes" / "comfyui" / "extra_schemas"
# Nodes of the pinned custom nodes, whose schema the recording (core ComfyUI) doesn't have.
CUSTOM = ["WanImageToVideoSVIPro", "ImageBatchExtendWithOverlap"]


@pytest.mark.parametrize("node", CUSTOM)
def test_the_pinned_custom_node_reports_the_schema_the_fake_serves(comfyui: ComfyTarget, node: str) -> None:
    if comfyui.is_fake:
        pytest.skip("the fake serves this very file; only a real ComfyUI can confirm it")
    response = requests.get(f"{comfyui.url}/object_info/{node}", timeout=30)
    response.raise_for_status()
    real = response.json()
    assert node in real, f"{node} is not registered: is the pinned ComfyUI-KJNodes in custom_nodes/?"
    assert real[node] == json.loads((EXTRA / f"{node}.json").read_text())
