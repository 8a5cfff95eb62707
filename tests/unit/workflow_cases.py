"""Requests for the typed workflows, every preset and option, and the plans they become."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

from PIL import Image

from diffbox.inputs.media import InputImage
from diffbox.workflows import parse
from diffbox.workflows.base import JobContext, Plan

CTX = JobContext("job-1")


def png(width: int = 64, height: int = 48) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stub_loader(width: int = 832, height: int = 480) -> Any:
    """An image loader that decodes nothing: every image is `width` x `height`, its bytes its value's."""

    def load(value: str, field: str) -> InputImage:
        return InputImage(data=value.encode(), extension="png", width=width, height=height)

    return load


def content_name(data: bytes, extension: str = "png") -> str:
    """The name the worker gives an input file: its sha256's first 32 hex digits."""
    return f"{hashlib.sha256(data).hexdigest()[:32]}.{extension}"


def write_uploads(plan: Plan, input_dir: Path) -> None:
    """A plan's input files where the worker puts them in ComfyUI's input folder."""
    for upload in plan.uploads:
        path = input_dir / CTX.input_ref(upload.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(upload.data)


def plan_of(payload: dict[str, Any], width: int = 832, height: int = 480) -> Plan:
    workflow, request = parse(payload)
    return workflow.plan(request, CTX, stub_loader(width, height))


# (id, request) for every graph shape the workflows can produce.
CASES: list[tuple[str, dict[str, Any]]] = [
    *[(f"i2v-{preset}", {"workflow": "i2v", "image": "x", "prompt": "p", "preset": preset})
      for preset in ("fast", "quality")],
    *[(f"i2v-{preset}-end", {"workflow": "i2v", "image": "x", "end_image": "y", "prompt": "p", "preset": preset})
      for preset in ("fast", "quality")],
    *[(f"svi-{preset}-{clips}", {"workflow": "svi", "image": "x", "prompt": "p", "clips": clips, "preset": preset})
      for preset in ("fast", "quality") for clips in (1, 2, 3, 5)],
    *[(f"qwen-{model}-{preset}-{n}", {"workflow": "qwen_edit", "images": ["x"] * n, "prompt": "p",
                                      "model": model, "preset": preset})
      for model in ("2511", "2509") for preset in ("fast", "quality") for n in (1, 2, 3)],
    *[(f"qwen-{model}-sized", {"workflow": "qwen_edit", "images": ["x", "y"], "prompt": "p", "model": model,
                               "width": 512, "height": 384}) for model in ("2511", "2509")],
]


def model_set(payload: dict[str, Any]) -> tuple[str, str]:
    workflow, request = parse(payload)
    assert workflow.models is not None
    return workflow.models(request)


def by_class(graph: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [node for node in graph.values() if node["class_type"] == class_type]


def titled(graph: dict[str, Any], title: str) -> dict[str, Any]:
    [node] = [n for n in graph.values() if n.get("_meta", {}).get("title") == title]
    return node
