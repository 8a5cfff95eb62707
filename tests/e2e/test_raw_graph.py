"""A raw ComfyUI graph end to end through the runpod SDK's own local API server.

Runs against the fake ComfyUI, or a real one when DIFFBOX_TEST_COMFYUI_URL is set: only
model-free nodes are used (core ones, and KJNodes' ImageBatchExtendWithOverlap, installed with
the pinned ComfyUI), so the assertions hold for both.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
from PIL import Image

from diffbox.workflows.graph import GraphBuilder
from diffbox.workflows.svi import EXTENDED_IMAGES, JOIN_MODE, join_clips
from tests.conftest import REPO, TEST_INPUT, ComfyTarget, RunpodApi, job_error, worker_env
from tests.jobkit import inversion_error, max_difference


def _input_image() -> Image.Image:
    data = base64.b64decode(TEST_INPUT["input"]["images"][0]["image"])
    return Image.open(io.BytesIO(data)).convert("RGB")


def _by_ext(images: list[dict[str, Any]], ext: str) -> dict[str, Any]:
    matches = [i for i in images if i["filename"].endswith(ext)]
    assert len(matches) == 1, images
    return matches[0]


def test_runsync_returns_inverted_image_and_video(rp_api: RunpodApi, tmp_path: Path) -> None:
    body = rp_api.runsync(TEST_INPUT["input"])
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    png = _by_ext(output["images"], ".png")
    assert png["type"] == "base64" and png["kind"] == "image" and png["content_type"] == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(png["data"]))).convert("RGB")
    assert (png["width"], png["height"]) == image.size == (64, 48)
    assert inversion_error(image, _input_image()) <= 1

    mp4 = _by_ext(output["images"], ".mp4")
    assert mp4["kind"] == "video" and mp4["content_type"] == "video/mp4"
    raw = base64.b64decode(mp4["data"])
    assert len(raw) == mp4["bytes"]
    path = tmp_path / "clip.mp4"
    path.write_bytes(raw)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == mp4["frames"] == 8
    assert (frames[0].width, frames[0].height) == (64, 48)
    assert set(output["timings"]) >= {"inputs_s", "queue_s", "inference_s", "upload_s", "total_s"}


def test_comfyui_validation_error_names_the_node(rp_api: RunpodApi) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    error = job_error(rp_api.runsync({"workflow": graph}))
    assert error["type"] == "validation"
    assert "node 1 (EmptyImage)" in error["message"] and "16384" in error["message"]
    node = error["details"]["node_errors"]["1"]
    assert node["class_type"] == "EmptyImage"
    assert node["errors"][0]["type"] == "value_bigger_than_max"
    # The worker is still healthy: the next job succeeds.
    assert rp_api.runsync(TEST_INPUT["input"])["status"] == "COMPLETED"


def test_runtime_error_names_node_class_and_exception(rp_api: RunpodApi) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "err"}},
    }
    error = job_error(rp_api.runsync({"workflow": graph}))
    assert error["type"] == "backend"
    assert error["message"].startswith("node 2 (ImageBlur) failed: RuntimeError: ")
    assert "Padding size" in error["message"]
    assert error["details"]["class_type"] == "ImageBlur"
    assert rp_api.runsync(TEST_INPUT["input"])["status"] == "COMPLETED"


def test_request_errors_name_the_field_and_never_reach_comfyui(rp_api: RunpodApi) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"workflow": TEST_INPUT["input"]["workflow"], "imagez": []}, "imagez: unknown field"),
        ({"workflow": TEST_INPUT["input"]["workflow"], "images": [{"name": "../x.png", "image": "AAAA"}]},
         "images.0.name"),
        ({"workflow": TEST_INPUT["input"]["workflow"], "images": [{"name": "input.png", "image": "not base64!"}]},
         "images[0].image: not valid base64"),
        ({"workflow": TEST_INPUT["input"]["workflow"],
          "images": [{"name": "input.png", "image": base64.b64encode(b"hello").decode()}]},
         "images[0].image: not a readable image"),
        ({"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}},
         "workflow.1.inputs.image: links to node '9'"),
        ({"workflow": {"1": {"inputs": {}}}}, "workflow.1: missing class_type"),
        ({"workflow": "no_such_workflow"}, "workflow: unknown workflow 'no_such_workflow'"),
    ]
    for job_input, expected in cases:
        error = job_error(rp_api.runsync(job_input))
        assert error["type"] == "validation", error
        assert expected in error["message"], (expected, error["message"])


def test_test_input_mode_runs_the_job(comfyui: ComfyTarget, tmp_path: Path) -> None:
    env = worker_env(comfyui, tmp_path / "work")
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(TEST_INPUT)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "completed successfully" in done.stdout + done.stderr
    # test_input.json from the current directory, as `python handler.py` on its own does.
    done = subprocess.run([sys.executable, "handler.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "inverted_00001_.png" in done.stdout + done.stderr


# The SVI join as ComfyUI runs it (model-free: solid-colour clips from EmptyImage): our tree of
# KJNodes' ImageBatchExtendWithOverlap gives the frames of the chain Kijai's example builds.
COLOURS = [(240, 0, 0), (0, 240, 0), (0, 0, 240), (240, 240, 0)]
FRAMES, OVERLAP = 12, 5


def _join_frames(output: dict[str, Any], prefix: str) -> list[Image.Image]:
    files = sorted((i for i in output["images"] if i["filename"].startswith(prefix)), key=lambda i: i["filename"])
    return [Image.open(io.BytesIO(base64.b64decode(i["data"]))).convert("RGB") for i in files]


def test_the_join_tree_gives_the_examples_chain(rp_api: RunpodApi) -> None:
    b = GraphBuilder({})
    clips = [b.add("EmptyImage", f"clip{k}", width=16, height=16, batch_size=FRAMES,
                   color=(r << 16) + (g << 8) + blue) for k, (r, g, blue) in enumerate(COLOURS)]
    b.add("SaveImage", "tree", images=join_clips(b, clips, OVERLAP), filename_prefix="tree")
    chain = clips[0]
    for k, clip in enumerate(clips[1:], start=1):
        b.add("ImageBatchExtendWithOverlap", f"chain{k}", source_images=chain, new_images=clip, overlap=OVERLAP,
              **JOIN_MODE)
        chain = b.out(f"chain{k}", EXTENDED_IMAGES)
    b.add("SaveImage", "chain", images=chain, filename_prefix="chain")

    body = rp_api.runsync({"workflow": b.graph})
    assert body["status"] == "COMPLETED", body
    tree, chained = _join_frames(body["output"], "tree"), _join_frames(body["output"], "chain")
    assert len(tree) == len(chained) == FRAMES + 3 * (FRAMES - OVERLAP)
    assert all(max_difference(a, c) <= 1 for a, c in zip(tree, chained, strict=True))
    # Clip 1 as it is up to the seam, then its last frames fade into clip 2's first ones.
    seam = FRAMES - OVERLAP
    assert tree[0].getpixel((0, 0)) == tree[seam - 1].getpixel((0, 0)) == COLOURS[0]
    middle = tree[seam + OVERLAP // 2].getpixel((0, 0))
    assert all(abs(m - (a + c) / 2) <= 1 for m, a, c in zip(middle, COLOURS[0], COLOURS[1], strict=True))
    assert tree[-1].getpixel((0, 0)) == COLOURS[3]
