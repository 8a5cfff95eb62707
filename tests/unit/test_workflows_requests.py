"""Typed requests: fields, defaults and limits (DESIGN.md section 2), errors that name the
field and the rule, sizes from the input's aspect, settings in the result, and the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from diffbox.__main__ import main
from diffbox.errors import JobError
from diffbox.workflows import parse
from tests.unit.workflow_cases import content_name, plan_of, png


def refusal(payload: dict[str, Any]) -> str:
    with pytest.raises(JobError) as caught:
        parse(payload)
    assert caught.value.type == "validation"
    return caught.value.message


I2V = {"workflow": "i2v", "image": "x", "prompt": "a cat"}
SVI = {"workflow": "svi", "image": "x", "prompt": "a cat"}
QWEN = {"workflow": "qwen_edit", "images": ["x"], "prompt": "make it blue"}


@pytest.mark.parametrize(("payload", "message"), [
    ({**I2V, "frames": 80}, "frames: must be 4n+1 between 5 and 161, got 80"),
    ({**I2V, "frames": 165}, "frames: must be 4n+1 between 5 and 161, got 165"),
    ({**I2V, "width": 500}, "width: must be a multiple of 16 between 256 and 1280, got 500"),
    ({**I2V, "height": 1296}, "height: must be a multiple of 16 between 256 and 1280, got 1296"),
    ({**I2V, "prompt": "x" * 2001}, "prompt: String should have at most 2000 characters"),
    ({**I2V, "steps": 1}, "steps: Input should be greater than or equal to 2"),
    ({**I2V, "preset": "turbo"}, "preset: Input should be 'fast' or 'quality'"),
    ({**I2V, "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({**I2V, "frame": 81}, "frame: unknown field"),
    ({"workflow": "i2v", "prompt": "p"}, "image: Field required"),
    ({**SVI, "prompts": ["a", "b"]}, "prompt: give prompt or prompts, not both"),
    ({"workflow": "svi", "image": "x"}, "prompt: required: give prompt (with clips) or prompts (one per clip)"),
    ({**SVI, "prompt": None, "prompts": ["a"], "clips": 2}, "clips: goes with prompt"),
    ({**SVI, "clips": 21}, "clips: Input should be less than or equal to 20"),
    ({**SVI, "prompt": None, "prompts": ["a"] * 21}, "prompts: List should have at most 20 items"),
    ({**SVI, "prompt": None, "prompts": ["a", ""]}, "prompts.1: String should have at least 1 character"),
    ({**SVI, "frames_per_clip": 9, "motion_latents": 2},
     "motion_latents: 2 overlaps 9 frames of each clip, which must be fewer than frames_per_clip (9)"),
    ({**QWEN, "images": []}, "images: List should have at least 1 item"),
    ({**QWEN, "images": ["a"] * 4}, "images: List should have at most 3 items"),
    ({**QWEN, "width": 1001}, "width: must be a multiple of 8 between 256 and 2048, got 1001"),
    ({**QWEN, "model": "2600"}, "model: Input should be '2511' or '2509'"),
])
def test_bad_values_are_refused_naming_field_and_rule(payload: dict[str, Any], message: str) -> None:
    assert refusal(payload).startswith(message)


def test_defaults_follow_the_design() -> None:
    _, i2v = parse(I2V)
    # shift None: the preset's (5, or 8 for quality with an end image, as the flf2v template)
    assert (i2v.frames, i2v.fps, i2v.preset, i2v.shift, i2v.seed) == (81, 16, "fast", None, None)  # type: ignore[attr-defined]
    assert i2v.negative_prompt.startswith("色调艳丽")  # type: ignore[attr-defined]
    _, svi = parse(SVI)
    assert (svi.frames_per_clip, svi.motion_latents, svi.clip_prompts()) == (81, 1, ["a cat"])  # type: ignore[attr-defined]
    _, qwen = parse({**QWEN, "model": 2509})
    assert (qwen.model, qwen.negative_prompt, qwen.preset) == ("2509", "", "fast")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("image", "expected"), [
    ((832, 480), (832, 480)),
    ((480, 832), (480, 832)),
    ((1920, 1080), (848, 480)),
    ((1000, 1000), (624, 624)),
    ((4000, 400), (1280, 256)),  # extreme aspects are clamped to the limits
])
def test_i2v_size_defaults_to_input_aspect_at_about_04_megapixels(
        image: tuple[int, int], expected: tuple[int, int]) -> None:
    settings = plan_of(I2V, *image).settings
    assert (settings["width"], settings["height"]) == expected


def test_one_side_given_takes_the_other_from_the_aspect() -> None:
    assert plan_of({**I2V, "width": 1024}, 1920, 1080).settings["height"] == 576
    assert plan_of({**I2V, "height": 720}, 1920, 1080).settings["width"] == 1280
    settings = plan_of({**I2V, "width": 512, "height": 512}, 1920, 1080).settings
    assert (settings["width"], settings["height"]) == (512, 512)


def test_qwen_size_defaults_to_the_kontext_size_nearest_the_first_images_aspect() -> None:
    # FluxKontextImageScale's choice, as in the official templates: about 1 MP, nearest in aspect.
    assert [(s["width"], s["height"]) for s in (plan_of(QWEN, w, h).settings for w, h in (
        (1024, 768), (768, 1024), (1000, 1000), (1920, 1080), (300, 2000)))] == [
        (1184, 880), (880, 1184), (1024, 1024), (1392, 752), (672, 1568)]


def test_settings_carry_what_the_job_used() -> None:
    i2v = plan_of({**I2V, "seed": 7, "preset": "quality", "frames": 33, "fps": 8}).settings
    assert i2v == {"seed": 7, "preset": "quality", "steps": 20, "switch_step": 10, "cfg": 3.5, "shift": 5.0,
                   "width": 832, "height": 480, "frames": 33, "fps": 8, "duration_s": 4.125}
    flf2v = plan_of({**I2V, "end_image": "y", "preset": "quality"}).settings
    assert (flf2v["steps"], flf2v["switch_step"], flf2v["cfg"], flf2v["shift"]) == (20, 10, 4.0, 8.0)
    assert plan_of({**I2V, "end_image": "y", "preset": "quality", "shift": 5.0, "cfg": 3.5}).settings["shift"] == 5.0
    svi_fast = plan_of({**SVI, "clips": 2}).settings
    assert (svi_fast["steps"], svi_fast["switch_step"], svi_fast["cfg"], svi_fast["shift"]) == (6, 3, 1.0, 5.0)
    drawn = plan_of(I2V).settings["seed"]
    assert isinstance(drawn, int) and 0 <= drawn < 2**53
    overridden = plan_of({**I2V, "steps": 8, "cfg": 2.0}).settings
    assert (overridden["steps"], overridden["switch_step"], overridden["cfg"]) == (8, 4, 2.0)
    svi = plan_of({**SVI, "clips": 3, "seed": 10}).settings
    assert (svi["seeds"], svi["frames"], svi["overlap_frames"], svi["duration_s"]) == ([10, 11, 12], 233, 5, 14.562)
    qwen = plan_of({**QWEN, "preset": "quality", "seed": 3}, 1000, 1000).settings
    assert qwen == {"seed": 3, "preset": "quality", "model": "2511", "steps": 40, "cfg": 4.0,
                    "width": 1024, "height": 1024}


def test_uploads_are_named_by_their_content_and_load_image_names_them() -> None:
    plan = plan_of({**QWEN, "images": ["a", "b", "c"]})
    names = [content_name(value) for value in (b"a", b"b", b"c")]
    assert [u.name for u in plan.uploads] == names
    loaded = [n["inputs"]["image"] for n in plan.graph.values() if n["class_type"] == "LoadImage"]
    assert sorted(loaded) == sorted(f"diffbox/in/{name}" for name in names)
    # The same image twice is one file, and another job's same image the same file.
    twice = plan_of({**QWEN, "images": ["a", "a"]})
    assert [u.name for u in twice.uploads] == [names[0]]
    assert {n["inputs"]["image"] for n in twice.graph.values() if n["class_type"] == "LoadImage"} == {
        f"diffbox/in/{names[0]}"}
    assert plan.graph == plan_of({**QWEN, "images": ["a", "b", "c"], "seed": plan.settings["seed"]}).graph


def test_schema_command_prints_the_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"I2VRequest", "SviRequest", "QwenEditRequest", "RawRequest"} <= set(schema["$defs"])
    assert main(["schema", "i2v"]) == 0
    i2v = json.loads(capsys.readouterr().out)
    assert {"image", "prompt", "frames", "preset"} <= set(i2v["properties"]) and i2v["additionalProperties"] is False


def test_graph_command_prints_the_graph(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "i2v", json.dumps({"image": png(), "prompt": "a cat", "seed": 4})]) == 0
    graph = json.loads(capsys.readouterr().out)
    samplers = [n for n in graph.values() if n["class_type"] == "KSamplerAdvanced"]
    assert [s["inputs"]["noise_seed"] for s in samplers if s["inputs"]["add_noise"] == "enable"] == [4]
    # An image it cannot decode (a URL, a placeholder) stands in at 832x480.
    assert main(["graph", "qwen_edit", '{"images": ["https://example.com/a.png"], "prompt": "x"}']) == 0
    assert "not decoded here" in capsys.readouterr().err
    assert main(["graph", "i2v", '{"image": "...", "prompt": "x", "frames": 80}']) == 2
    assert "frames: must be 4n+1 between 5 and 161, got 80" in capsys.readouterr().err
