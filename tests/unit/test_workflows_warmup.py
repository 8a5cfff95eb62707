"""Warm-up requests (DIFFBOX_WARMUP): valid, minimal, and loading the preset's own weights."""

from __future__ import annotations

from typing import Any

import pytest

from diffbox import warmup
from diffbox.workflows import manifest, parse
from tests.unit.workflow_cases import model_set, plan_of


@pytest.mark.parametrize(("spec", "expected"), [
    ("i2v", ("i2v", "fast")),
    ("i2v:quality", ("i2v", "quality")),
    ("svi:fast", ("svi", "fast")),
    ("qwen_edit:fast", ("qwen_edit:2511", "fast")),
    ("qwen_edit:2509:quality", ("qwen_edit:2509", "quality")),
])
def test_warm_up_request_is_valid_small_and_loads_the_preset_weights(spec: str, expected: tuple[str, str]) -> None:
    payload = warmup.request_for(spec)
    parse(payload)
    assert model_set(payload) == expected
    assert payload["output"] == {"store": "inline"}
    settings = plan_of(payload).settings
    assert (settings["width"], settings["height"]) == (256, 256) and settings["steps"] <= 2
    assert manifest.load().required(*expected)  # the weights the first real job will need


def test_unknown_warm_up_workflow_is_skipped_not_fatal() -> None:
    ran: list[str] = []

    def run(job_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        ran.append(job_id)
        return {"workflow": payload["workflow"], "outputs": []}

    timings = warmup.warm_up(["nope:fast", "qwen_edit:fast", "i2v:fast"], lambda name: name != "qwen_edit", run)
    assert ran == ["warmup-i2v-fast"]
    assert set(timings) == {"warmup_s"}


def test_failed_warm_up_is_logged_and_timed() -> None:
    timings = warmup.warm_up(["i2v"], lambda name: True,
                             lambda job_id, payload: {"error": {"type": "backend", "message": "missing model files"}})
    assert timings["warmup_s"] >= 0
    assert warmup.warm_up([], lambda name: True, lambda job_id, payload: {}) == {}
