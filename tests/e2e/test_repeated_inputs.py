"""An image a job sent before is the same file to ComfyUI, on both legs: the nodes that only
depend on it come from ComfyUI's cache (a Qwen edit's encodes, on a GPU too), the output is as
correct as the first, and the file goes when the last job holding it ends."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffbox.service import Service
from tests.conftest import ComfyTarget
from tests.jobkit import Baseline, invert_job, is_inversion_of, png_b64, settings


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.executed: list[list[str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "prompt node times":
            self.executed.append([node["class"] for node in record.__dict__["fields"]["nodes"]])


@contextlib.contextmanager
def _node_times() -> Iterator[_Records]:
    """The classes of the nodes each prompt ran (the worker's DEBUG `prompt node times`):
    ComfyUI announces no node it answers from its cache."""
    logger, handler = logging.getLogger("diffbox.comfyui"), _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_an_image_sent_again_is_answered_from_comfyui_s_cache(comfyui: ComfyTarget, tmp_path: Path) -> None:
    baseline = Baseline.take()
    service = Service(settings(comfyui, tmp_path))
    image, other = png_b64((200, 30, 90), (40, 30)), png_b64((10, 250, 40), (40, 30))
    results: list[dict[str, Any]] = []
    with _node_times() as records:
        for job_id, source in (("first", image), ("again", image), ("other", other)):
            result = await service.run(job_id, invert_job(source))
            assert "error" not in result, result
            assert is_inversion_of(result["images"][0]["data"], source), job_id
            results.append(result)
    assert records.executed == [
        ["LoadImage", "ImageInvert", "SaveImage"],
        ["SaveImage"],  # its own file name: the job's folder; the image and its inversion from the cache
        ["LoadImage", "ImageInvert", "SaveImage"],
    ], json.dumps(records.executed)
    service.stop()
    baseline.assert_nothing_left(comfyui, tmp_path / "work", "first", "again", "other")
    assert service.comfy_inputs is not None and comfyui.base_dir is not None
    assert not (comfyui.base_dir / "input" / service.comfy_inputs.folder).exists()  # the folder went too
