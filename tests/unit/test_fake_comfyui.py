"""The fake ComfyUI (tests/fakes/comfyui) against recordings of a real ComfyUI 0.3.64.

One fake process serves the module. The recordings it is compared with live in
tests/fakes/comfyui/recorded/. Where a comparison depends on what ComfyUI has cached from the
previous prompt, the test first runs the prompt the recording ran before it (ComfyUI keeps only
the last prompt's nodes), or evicts the cache with an unrelated prompt.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest
import requests
import websocket
from PIL import Image

from tests.fakes.comfyui import FakeComfyUIProcess, start_fake_comfyui, write_comfyui_dir
from tests.fakes.comfyui.faults import clear_faults, get_config, get_faults, set_config, set_fault
from tests.jobkit import wait_until

RECORDED = Path(__file__).resolve().parents[1] / "fakes" / "comfyui" / "recorded"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
TEMP_NAME_RE = re.compile(r"ComfyUI_temp_[a-z]{5}_")
TIMEOUT = 15.0


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def http_log() -> dict[str, dict[str, Any]]:
    lines = (RECORDED / "http_log_more.subset.jsonl").read_text().splitlines()
    return {entry["label"]: entry for entry in map(json.loads, lines)}


def ws_scenario(name: str) -> list[dict[str, Any]]:
    lines = (RECORDED / "ws_trace_more.subset.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["scenario"] == name]


def recorded_job(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the job file, its history entry) of recorded/job_<name>.json."""
    job = recorded(f"job_{name}.json")
    return job, next(iter(job["history"]["body"].values()))


def probe_image() -> Image.Image:
    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, (x + y) % 256) for y in range(48) for x in range(64)])
    return image


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Fake:
    url: str
    base: Path
    process: FakeComfyUIProcess

    @property
    def ws_url(self) -> str:
        return "ws://" + self.url.removeprefix("http://")


@dataclass
class Shim:
    """A fake started the way the worker starts ComfyUI: `python main.py ...` in a ComfyUI folder."""

    path: Path
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    comfy_dir = tmp_path_factory.mktemp("shim") / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    proc = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", "0", "--cpu",
                             "--use-sage-attention"], cwd=comfy_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield Shim(comfy_dir, proc)
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory, shim: Shim) -> Iterator[Fake]:
    # The shim process starts first so that both start-ups overlap.
    base = tmp_path_factory.mktemp("comfyui")
    (base / "input").mkdir()
    probe_image().save(base / "input" / "probe.png")
    probe_image().save(base / "input" / "probe_in.png")
    (base / "input" / "corrupt.png").write_bytes(b"this is not an image")
    with start_fake_comfyui(base, "--cpu") as process:
        yield Fake(process.url, base, process)


@pytest.fixture
def weights(fake: Fake) -> Iterator[Path]:
    """The weight files the recorded sampler runs used, as empty stand-ins; removed afterwards
    so that the validation replays see the empty model lists of the recording."""
    files = [fake.base / "models" / "checkpoints" / "tiny_sd15_random.safetensors",
             fake.base / "models" / "vae_approx" / "taesd_encoder.pth",
             fake.base / "models" / "vae_approx" / "taesd_decoder.pth"]
    for path in files:
        path.write_bytes(b"")
    yield fake.base / "models"
    for path in files:
        path.unlink()


class WsClient:
    """A websocket-client connection that records every message, binary frames decoded."""

    def __init__(self, fake: Fake, client_id: str | None = None, feature_flags: bool = False) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self.ws = websocket.create_connection(f"{fake.ws_url}/ws?clientId={self.client_id}", timeout=TIMEOUT)
        self.messages: list[dict[str, Any]] = []
        self.recv()
        if feature_flags:
            self.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            self.recv()

    def recv(self) -> dict[str, Any]:
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_BINARY:
            event = struct.unpack(">I", data[:4])[0]
            message: dict[str, Any] = {"kind": "binary", "event": event}
            if event == 1:
                message.update(image_type=struct.unpack(">I", data[4:8])[0], image=data[8:])
            else:
                size = struct.unpack(">I", data[4:8])[0]
                message.update(metadata=json.loads(data[8:8 + size]), image=data[8 + size:])
        else:
            message = json.loads(data)
        self.messages.append(message)
        return message

    def until(self, predicate: Any) -> dict[str, Any]:
        while True:
            message = self.recv()
            if predicate(message):
                return message

    def until_done(self, prompt_id: str) -> list[dict[str, Any]]:
        self.until(lambda m: m.get("type") == "executing" and m["data"]["node"] is None
                   and m["data"].get("prompt_id") == prompt_id)
        return self.messages

    def close(self) -> None:
        self.ws.close()


def post_prompt(fake: Fake, graph: dict[str, Any], client_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": graph, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    response = requests.post(f"{fake.url}/prompt", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return dict(response.json())


def history(fake: Fake, prompt_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{fake.url}/history/{prompt_id}", timeout=TIMEOUT).json()[prompt_id])


@dataclass
class Job:
    answer: dict[str, Any]
    messages: list[dict[str, Any]]
    history: dict[str, Any]


def run_job(fake: Fake, graph: dict[str, Any], feature_flags: bool = False, **extra: Any) -> Job:
    client = WsClient(fake, feature_flags=feature_flags)
    try:
        answer = post_prompt(fake, graph, client.client_id, **extra)
        messages = client.until_done(answer["prompt_id"])
    finally:
        client.close()
    return Job(answer, messages, history(fake, answer["prompt_id"]))


def wait_history(fake: Fake, prompt_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = requests.get(f"{fake.url}/history/{prompt_id}", timeout=TIMEOUT).json()
        if found:
            return dict(found[prompt_id])
        time.sleep(0.01)
    raise AssertionError(f"no history for {prompt_id}")


def evict(fake: Fake, graph: dict[str, Any] | None = None) -> None:
    """Run a prompt without a client: ComfyUI's cache then holds only that prompt's nodes."""
    graph = graph or {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    wait_history(fake, post_prompt(fake, graph)["prompt_id"])


def summary(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a client can rely on in a message sequence, without ids and timestamps. Reads our
    messages and both recording formats."""
    out: list[tuple[Any, ...]] = []
    for m in messages:
        if m.get("kind") in ("opcode8", "closed"):
            continue
        if m.get("binary") or m.get("kind") == "binary":
            event = m.get("first4_event", m.get("event"))
            metadata = m.get("metadata") or {}
            out.append(("binary", event, m.get("next4", m.get("image_type", metadata.get("image_type"))),
                        tuple(sorted(metadata))))
            continue
        kind, data = m["type"], m["data"]
        if kind == "status":
            out.append((kind, data["status"]["exec_info"]["queue_remaining"], "sid" in data))
        elif kind == "execution_cached":
            out.append((kind, tuple(data["nodes"])))
        elif kind == "progress_state":
            out.append((kind, tuple((k, v["state"], repr(v["value"]), repr(v["max"]), tuple(v))
                                    for k, v in data["nodes"].items())))
        elif kind == "executing":
            out.append((kind, data["node"], tuple(data)))
        elif kind == "executed":
            out.append((kind, data["node"], tuple(data), tuple(data["output"] or ())))
        elif kind == "progress":
            out.append((kind, data["value"], data["max"], data["node"], tuple(data)))
        elif kind in ("execution_error", "execution_interrupted"):
            out.append((kind, data["node_id"], data["node_type"], tuple(sorted(data["executed"])), tuple(data)))
        elif kind == "feature_flags":
            out.append((kind, json.dumps(data, sort_keys=True)))
        else:
            out.append((kind, tuple(data)))
    return out


def scrub(value: Any, swaps: dict[str, str] | None = None) -> Any:
    """Ids, timestamps, prompt numbers and random temp names out; test-specific names swapped back."""
    text = json.dumps(value)
    for ours, theirs in (swaps or {}).items():
        text = text.replace(ours, theirs)
    text = TEMP_NAME_RE.sub("ComfyUI_temp_xxxxx_", UUID_RE.sub("<id>", text))

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: 0 if k == "timestamp" else walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    cleaned = walk(json.loads(text))
    if isinstance(cleaned, dict) and isinstance(cleaned.get("prompt"), list):
        cleaned["prompt"][0] = 0
    return cleaned


def sorted_outputs(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry with its execution_error's current_outputs (a set in ComfyUI) sorted."""
    for _, data in entry["status"]["messages"]:
        if "current_outputs" in data:
            data["current_outputs"] = sorted(data["current_outputs"])
    return entry


def sorted_errors(body: Any) -> Any:
    """ComfyUI checks a node's inputs in set order (random per process): compare errors as a set."""
    body = copy.deepcopy(body)
    if isinstance(body, dict):
        for entry in (body.get("node_errors") or {}).values():
            entry["errors"] = sorted(entry["errors"], key=lambda e: json.dumps(e, sort_keys=True))
    return body


# ---------------------------------------------------------------------------------------------
# HTTP routes
# ---------------------------------------------------------------------------------------------

GET_EXCHANGES = [
    ("/embeddings", "GET_embeddings.json"),
    ("/extensions", "GET_extensions.json"),
    ("/features", "GET_features.json"),
    ("/models", "GET_models.json"),
    ("/models/checkpoints", "GET_models_checkpoints.json"),
    ("/models/diffusion_models", "GET_models_diffusion_models.json"),
    ("/models/loras", "GET_models_loras.json"),
    ("/object_info/ImageInvert", "GET_object_info_ImageInvert.json"),
    ("/api/object_info/ImageInvert", "GET_object_info_ImageInvert.json"),
    ("/settings", "GET_settings.json"),
]


@pytest.mark.parametrize(("path", "exchange"), GET_EXCHANGES)
def test_get_routes_answer_as_recorded(fake: Fake, path: str, exchange: str) -> None:
    want = recorded(exchange)
    response = requests.get(fake.url + path, timeout=TIMEOUT)
    assert (response.status_code, response.headers["Content-Type"], response.json()) == (
        want["status"], want["content_type"], want["body"])


def test_idle_queue_unknown_ids_and_system_stats(fake: Fake) -> None:
    log = http_log()
    for path, want in [("/queue", recorded("GET_queue.json")["body"]), ("/prompt", recorded("GET_prompt.json")["body"]),
                       ("/history/00000000-0000-0000-0000-000000000000", log["history_unknown"]["body"]),
                       ("/object_info/NoSuchNode", log["object_info_unknown"]["body"])]:
        assert requests.get(fake.url + path, timeout=TIMEOUT).json() == want, path
    assert requests.get(f"{fake.url}/models/nope", timeout=TIMEOUT).status_code == 404

    want = recorded("GET_system_stats.json")["body"]
    stats = requests.get(f"{fake.url}/api/system_stats", timeout=TIMEOUT).json()
    assert stats.keys() == want.keys() and stats["system"].keys() == want["system"].keys()
    assert stats["devices"][0].keys() == want["devices"][0].keys()
    assert (stats["system"]["comfyui_version"], stats["devices"][0]["type"]) == ("0.3.64", "cpu")
    assert stats["system"]["argv"][0] == "main.py" and "--cpu" in stats["system"]["argv"]
    assert len(requests.get(f"{fake.url}/object_info", timeout=TIMEOUT).json()) >= 478


def test_model_and_image_lists_follow_the_disk(fake: Fake) -> None:
    models = fake.base / "models"
    files = [models / "checkpoints" / "sub" / "a.safetensors", models / "unet" / "u.safetensors",
             models / "diffusion_models" / "d.gguf", models / "clip" / "t5.safetensors",
             models / "vae_approx" / "taesdxl_encoder.pth", models / "vae_approx" / "taesdxl_decoder.pth",
             models / "loras" / "l.pt", models / "checkpoints" / "notes.txt"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    try:
        info = requests.get(f"{fake.url}/object_info", timeout=TIMEOUT).json()
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["sub/a.safetensors"]
        assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["u.safetensors"]  # .gguf is not listed
        assert info["DualCLIPLoader"]["input"]["required"]["clip_name2"][0] == ["t5.safetensors"]
        assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["taesdxl", "pixel_space"]
        assert info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0] == ["l.pt"]
        images = info["LoadImage"]["input"]["required"]["image"][0]
        # ComfyUI lists the files directly in input/ only (sorted); subfolder files are valid all the same.
        assert {"corrupt.png", "probe.png", "probe_in.png"} <= set(images) and images == sorted(images)
        assert not any("/" in name for name in images)
        assert requests.get(f"{fake.url}/models/checkpoints", timeout=TIMEOUT).json() == ["sub/a.safetensors"]
        graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "u.safetensors", "weight_dtype": "default"}},
                 "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sub/a.safetensors"}},
                 "3": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 2]}},
                 "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
                 "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
        job = run_job(fake, graph)
        assert job.history["status"]["status_str"] == "success"
    finally:
        for path in files:
            path.unlink()
    assert requests.get(f"{fake.url}/models/checkpoints", timeout=TIMEOUT).json() == []


# ---------------------------------------------------------------------------------------------
# POST /prompt validation
# ---------------------------------------------------------------------------------------------

VALIDATION_LABELS = [label for label in http_log() if label.startswith(("validation_", "seed_"))]


@pytest.mark.parametrize("label", VALIDATION_LABELS)
def test_validation_answers_equal_the_recorded_ones(fake: Fake, label: str) -> None:
    entry = http_log()[label]
    # The recording had uploaded input.png before its seed_qwen graph.
    extra_input = fake.base / "input" / "input.png" if label == "seed_qwen" else None
    if extra_input:
        probe_image().save(extra_input)
    try:
        if entry["request_json"] is None:
            response = requests.post(f"{fake.url}/prompt", data="{not json", timeout=TIMEOUT)
        else:
            response = requests.post(f"{fake.url}/prompt", json=entry["request_json"], timeout=TIMEOUT)
    finally:
        if extra_input:
            extra_input.unlink()
    assert (response.status_code, response.headers["Content-Type"]) == (entry["status"], entry["content_type"])
    body = response.json() if response.status_code != 500 else response.text
    assert sorted_errors(body) == sorted_errors(entry["body"])


def _sampler_graph(ckpt: str, unet: bool = False) -> dict[str, Any]:
    return {
        "1": ({"class_type": "UNETLoader", "inputs": {"unet_name": ckpt, "weight_dtype": "default"}} if unet
              else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}),
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "nope_te.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "nope_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "v"}},
    }


def _load(image: str) -> dict[str, Any]:
    return {"class_type": "LoadImage", "inputs": {"image": image}}


def _save(source: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": "v"}}


# The recording kept the answers of these, not the graphs: these graphs give the same answers.
REBUILT_GRAPHS: dict[str, Any] = {
    "prompt_err_bad_link.json": {"prompt": {"1": _load("probe_in.png"), "3": _save("99")}},
    "prompt_err_bad_value_type.json": {"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "abc", "height": 64, "batch_size": 1, "color": 0}},
        "2": _save("1")}},
    "prompt_err_missing_ckpt.json": {"prompt": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": _save("3")}},
    "prompt_err_missing_image_file.json": {"prompt": {"1": _load("does_not_exist.png"), "2": _save("1")}},
    "prompt_err_missing_input.json": {"prompt": {
        "1": _load("probe_in.png"), "2": {"class_type": "ImageInvert", "inputs": {}}, "3": _save("2")}},
    "prompt_err_missing_unet.json": {"prompt": _sampler_graph("nope.safetensors", unet=True)},
    "prompt_err_no_output_node.json": {"prompt": {
        "1": _load("probe_in.png"), "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}},
    "prompt_err_type_mismatch_link.json": {"prompt": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v"}}}},
    "prompt_err_unknown_class.json": {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}, "2": _save("1")}},
    "prompt_err_value_out_of_range.json": {"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 64, "batch_size": 1, "color": 0}},
        "2": _save("1")}},
    "prompt_seed_i2v.json": http_log()["seed_i2v"]["request_json"],
    "prompt_seed_i2v_vhs_replaced.json": http_log()["seed_i2v_with_core_video_nodes"]["request_json"],
    "prompt_seed_qwen.json": http_log()["seed_qwen"]["request_json"],  # without input.png this time
    "err_empty_prompt.json": {"prompt": {}},
    "err_no_class_type.json": {"prompt": {"1": {"inputs": {}}, "2": _save("1")}},
    "err_no_prompt_key.json": {"client_id": "x"},
    "err_prompt_list.json": {"prompt": [1, 2]},
    "err_not_json.json": "{not json",
}


@pytest.mark.parametrize("exchange", list(REBUILT_GRAPHS))
def test_recorded_error_answers_for_rebuilt_graphs(fake: Fake, exchange: str) -> None:
    want = recorded(exchange)
    body = REBUILT_GRAPHS[exchange]
    if isinstance(body, str):
        response = requests.post(f"{fake.url}/prompt", data=body, timeout=TIMEOUT)
    else:
        response = requests.post(f"{fake.url}/prompt", json=body, timeout=TIMEOUT)
    assert (response.status_code, response.headers["Content-Type"]) == (want["status"], want["content_type"])
    got = response.json() if response.status_code != 500 else {"_text": response.text}
    assert sorted_errors(got) == sorted_errors(want["body"])


def test_accepted_prompt_numbers_and_extra_data(fake: Fake) -> None:
    graph = {"1": _load("probe.png"), "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    first = post_prompt(fake, graph)
    assert first.keys() == {"prompt_id", "number", "node_errors"} and first["node_errors"] == {}
    second = post_prompt(fake, graph, extra_data={"foo": 1, "api_key_comfy_org": "secret"}, client_id="c1")
    front = post_prompt(fake, graph, front=True)
    given = post_prompt(fake, graph, number=1000, prompt_id="11111111-2222-3333-4444-555555555555")
    assert (second["number"], front["number"]) == (first["number"] + 1, -(first["number"] + 2))
    assert given == {"prompt_id": "11111111-2222-3333-4444-555555555555", "number": 1000.0, "node_errors": {}}
    entry = wait_history(fake, second["prompt_id"])
    assert entry["prompt"][3] == {"foo": 1, "client_id": "c1"}  # the API key stays out of the history
    assert len(entry["prompt"]) == 5
    wait_history(fake, given["prompt_id"])


# ---------------------------------------------------------------------------------------------
# Jobs: messages, history, files
# ---------------------------------------------------------------------------------------------


def test_recorded_image_and_video_jobs_replay_message_for_message(fake: Fake) -> None:
    """The first six jobs of the recording, in its order, so the cache state matches at each step."""
    token = f"t{uuid.uuid4().hex[:8]}"
    (fake.base / "input" / token).mkdir()
    shutil.copy(fake.base / "input" / "probe_in.png", fake.base / "input" / token / "probe_in.png")
    swaps = {f"{token}/probe_in.png": "probe_in.png", token: "probe"}
    evict(fake)
    numbers = []
    for name in ("invert", "invert_again_cached", "video", "ws_binary", "preview", "with_extra"):
        job, want = recorded_job(name)
        graph = json.loads(json.dumps(want["prompt"][2]).replace("probe_in.png", f"{token}/probe_in.png")
                           .replace('"probe/', f'"{token}/'))
        extra: dict[str, Any] = {"extra_data": {"foo": 1}} if name == "with_extra" else {}
        got = run_job(fake, graph, **extra)
        numbers.append(got.answer["number"])
        assert summary(got.messages) == summary(job["ws"]), name
        assert scrub(got.history, swaps) == scrub(want, swaps), name
    assert numbers == list(range(numbers[0], numbers[0] + 6))

    # The SaveImage output really is the inverse of the input.
    out = requests.get(f"{fake.url}/view", params={"filename": "inv_00001_.png", "subfolder": token,
                                                   "type": "output"}, timeout=TIMEOUT)
    assert (out.status_code, out.headers["Content-Type"]) == (200, "image/png")
    inverted = Image.open(io.BytesIO(out.content)).convert("RGB")
    assert inverted.tobytes() == bytes(255 - b for b in probe_image().tobytes())
    # The mp4 decodes to the 8 frames of RepeatImageBatch, at the input's size and 16 fps.
    video = requests.get(f"{fake.url}/view", params={"filename": "vid_00001_.mp4", "subfolder": token,
                                                     "type": "output"}, timeout=TIMEOUT)
    assert video.headers["Content-Type"] == recorded("view_video.json")["headers"]["Content-Type"]
    with av.open(io.BytesIO(video.content), mode="r") as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (len(frames), stream.width, stream.height, stream.codec_context.name) == (8, 64, 48, "h264")
        assert stream.average_rate == 16
        assert frames[0].format.name == "yuv420p"


def test_animated_webm_job_replays_and_decodes(fake: Fake) -> None:
    job, want = recorded_job("fmt_webm")
    token = f"t{uuid.uuid4().hex[:8]}"
    graph = json.loads(json.dumps(want["prompt"][2]).replace('"probe/', f'"{token}/'))
    wait_history(fake, post_prompt(fake, {"1": graph["1"], "2": graph["2"],
                                          "9": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}}})
                 ["prompt_id"])  # the recording had nodes 1 and 2 cached
    got = run_job(fake, graph)
    assert summary(got.messages) == summary(job["ws"])
    assert scrub(got.history["outputs"], {token: "probe"}) == want["outputs"]
    with av.open(str(fake.base / "output" / token / "webm_00001_.webm")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4


def test_sampler_previews_and_interrupt_replay_the_recording(fake: Fake, weights: Path) -> None:
    log = http_log()
    evict(fake)
    legacy = run_job(fake, log["prompt_ksampler_legacy_client"]["request_json"]["prompt"])
    assert summary(legacy.messages) == summary(ws_scenario("ksampler_legacy_client"))
    frames = [m for m in legacy.messages if m.get("kind") == "binary"]
    assert [f["image_type"] for f in frames] == [1] * 6  # JPEG, one per step
    assert Image.open(io.BytesIO(frames[0]["image"])).format == "JPEG"

    flagged = run_job(fake, log["prompt_ksampler_feature_flags_client"]["request_json"]["prompt"],
                      feature_flags=True)
    assert summary(flagged.messages) == summary(ws_scenario("ksampler_feature_flags_client"))
    preview = next(m for m in flagged.messages if m.get("kind") == "binary")
    assert preview["metadata"] == {"node_id": "5", "prompt_id": flagged.answer["prompt_id"], "display_node_id": "5",
                                   "parent_node_id": None, "real_node_id": "5", "image_type": "image/jpeg"}
    counters = [int(job.history["outputs"]["8"]["images"][0]["filename"].split("_")[1]) for job in (legacy, flagged)]
    assert counters[1] == counters[0] + 1  # SaveImage counts up per prefix, as recorded (tiny_00001_, tiny_00002_)

    set_config(fake.url, step_delay_s=0.08)  # the interrupt lands within step 6, as recorded
    client = WsClient(fake)
    try:
        answer = post_prompt(fake, log["prompt_ksampler_long"]["request_json"]["prompt"], client.client_id)
        client.until(lambda m: m.get("type") == "progress" and m["data"]["value"] == 5)
        other = requests.post(f"{fake.url}/interrupt", json={"prompt_id": str(uuid.uuid4())}, timeout=TIMEOUT)
        mine = requests.post(f"{fake.url}/interrupt", json={"prompt_id": answer["prompt_id"]}, timeout=TIMEOUT)
        messages = client.until_done(answer["prompt_id"])
    finally:
        set_config(fake.url, step_delay_s=0.01)
        client.close()
    assert (other.status_code, other.text, mine.status_code, mine.text) == (200, "", 200, "")
    assert summary(messages) == summary(ws_scenario("ksampler_interrupt"))
    want = next(iter(log["history_ksampler_interrupted"]["body"].values()))
    assert scrub(history(fake, answer["prompt_id"])) == scrub(want)


def test_binary_frames_with_and_without_feature_flags(fake: Fake) -> None:
    graph = http_log()["prompt_binary_legacy_client"]["request_json"]["prompt"]
    evict(fake, {"1": graph["1"], "9": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}})
    legacy = run_job(fake, graph)
    assert summary(legacy.messages) == summary(ws_scenario("binary_legacy_client"))
    flagged = run_job(fake, graph, feature_flags=True)
    assert summary(flagged.messages) == summary(ws_scenario("binary_feature_flags_client"))
    for message in (m for m in legacy.messages + flagged.messages if m.get("kind") == "binary"):
        image = Image.open(io.BytesIO(message["image"]))
        assert (image.format, image.size) == ("PNG", (64, 48))
    assert legacy.history["outputs"] == {} and legacy.history["meta"] == {}


def test_runtime_errors_match_the_recordings(fake: Fake) -> None:
    evict(fake)
    corrupt = fake.base / "models" / "checkpoints" / "fake_corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    try:
        for name in ("runtime_error", "runtime_error_corrupt_ckpt"):
            job, want = recorded_job(name)
            got = run_job(fake, want["prompt"][2])
            assert summary(got.messages) == summary(job["ws"]), name
            ours = next(m["data"] for m in got.messages if m.get("type") == "execution_error")
            theirs = next(m["data"] for m in job["ws"] if m.get("type") == "execution_error")
            # current_outputs is a set in ComfyUI: its order is random per process.
            assert sorted(ours.pop("current_outputs")) == sorted(theirs.pop("current_outputs"))
            assert scrub(ours) == scrub(theirs), name
            assert sorted_outputs(scrub(got.history)) == sorted_outputs(scrub(want)), name
    finally:
        corrupt.unlink()


def test_failed_job_keeps_outputs_of_nodes_that_finished(fake: Fake) -> None:
    evict(fake)
    graph = {"1": _load("probe.png"), "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                                                   "filename_prefix": "partial"}},
             "3": _load("corrupt.png"), "4": _save("3")}
    job = run_job(fake, graph)
    error = next(m["data"] for m in job.messages if m.get("type") == "execution_error")
    assert (error["node_id"], error["exception_type"]) == ("3", "PIL.UnidentifiedImageError")
    assert error["exception_message"].startswith("cannot identify image file ") and error["current_inputs"] == {
        "image": ["corrupt.png"]}
    assert (job.history["status"]["status_str"], job.history["status"]["completed"]) == ("error", False)
    assert list(job.history["outputs"]) == ["2"] and job.history["meta"]["2"]["node_id"] == "2"


def test_uploads_and_views_answer_as_recorded(fake: Fake) -> None:
    log = http_log()
    name = f"up_{uuid.uuid4().hex[:8]}.png"

    def upload(data: bytes, filename: str = name, **fields: str) -> requests.Response:
        return requests.post(f"{fake.url}/upload/image", files={"image": (filename, data, "image/png")}, data=fields,
                             timeout=TIMEOUT)

    def body(label: str) -> Any:
        return json.loads(json.dumps(log[label]["body"]).replace("probe", name.removesuffix(".png")))

    for response, label in [
        (upload(png_bytes((1, 2, 3))), "upload_first"),
        (upload(png_bytes((1, 2, 3))), "upload_same_bytes_again"),
        (upload(png_bytes((9, 9, 9))), "upload_same_name_diff_bytes"),
        (upload(png_bytes((9, 9, 9)), overwrite="true"), "upload_overwrite_true"),
        (upload(png_bytes((1, 2, 3)), subfolder="jobs/abc", type="input"), "upload_subfolder"),
    ]:
        assert (response.status_code, response.headers["Content-Type"], response.json()) == (
            200, log[label]["content_type"], body(label)), label
    for response, label in [
        (requests.post(f"{fake.url}/upload/image", data={"foo": "bar"}, timeout=TIMEOUT), "upload_no_file"),
        (upload(png_bytes((1, 2, 3)), filename="../escape.png"), "upload_path_traversal"),
    ]:
        assert (response.status_code, response.headers.get("Content-Type", ""), response.text) == (400, "", ""), label
    assert not (fake.base / "escape.png").exists()

    view = requests.get(f"{fake.url}/view", params={"filename": name, "type": "input"}, timeout=TIMEOUT)
    want = recorded("view_image.json")["headers"]
    assert (view.status_code, view.headers["Content-Type"]) == (200, want["Content-Type"])
    assert view.headers["Content-Disposition"] == f'filename="{name}"' and view.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(view.content)).getpixel((0, 0)) == (9, 9, 9)
    sub = requests.get(f"{fake.url}/view", params={"filename": name, "subfolder": "jobs/abc", "type": "input"},
                       timeout=TIMEOUT)
    assert Image.open(io.BytesIO(sub.content)).getpixel((0, 0)) == (1, 2, 3)
    preview = requests.get(f"{fake.url}/view", params={"filename": name, "type": "input", "preview": "webp;50"},
                           timeout=TIMEOUT)
    assert preview.headers["Content-Type"] == "image/webp"
    for params, status in [({"filename": "nope.png", "type": "output"}, 404),
                           ({"filename": "../../etc/passwd", "type": "output"}, 400),
                           ({"filename": name}, 404),  # type defaults to output
                           ({"filename": name, "type": "input", "subfolder": "../.."}, 403)]:
        response = requests.get(f"{fake.url}/view", params=params, timeout=TIMEOUT)
        assert (response.status_code, response.content) == (status, b""), params


# ---------------------------------------------------------------------------------------------
# Queue, interrupt, history, reconnects
# ---------------------------------------------------------------------------------------------


def _slow_graph(weights: Path, seed: int, steps: int = 40) -> dict[str, Any]:
    graph = copy.deepcopy(http_log()["prompt_ksampler_legacy_client"]["request_json"]["prompt"])
    graph["5"]["inputs"].update(seed=seed, steps=steps)
    return dict(graph)


def test_queue_delete_clear_interrupt_and_history_routes(fake: Fake, weights: Path) -> None:
    set_config(fake.url, step_delay_s=0.05)
    observer = WsClient(fake)
    try:
        ids = [post_prompt(fake, _slow_graph(weights, 100), observer.client_id)["prompt_id"]]
        observer.until(lambda m: m.get("type") == "progress")
        ids += [post_prompt(fake, _slow_graph(weights, 101 + i), observer.client_id)["prompt_id"] for i in range(3)]
        queue = requests.get(f"{fake.url}/queue", timeout=TIMEOUT).json()
        assert [entry[1] for entry in queue["queue_running"]] == ids[:1]
        assert [entry[1] for entry in queue["queue_pending"]] == ids[1:]
        shape = recorded("queue_during_run.json")["body"]["queue_running"][0]
        assert [type(x) for x in queue["queue_running"][0]] == [type(x) for x in shape]
        assert queue["queue_running"][0][3] == {"client_id": observer.client_id} and queue["queue_running"][0][4] == [
            "8"]
        assert requests.get(f"{fake.url}/prompt", timeout=TIMEOUT).json() == {"exec_info": {"queue_remaining": 4}}

        deleted = requests.post(f"{fake.url}/queue", json={"delete": [ids[2]]}, timeout=TIMEOUT)
        assert (deleted.status_code, deleted.text) == (200, "")
        pending = requests.get(f"{fake.url}/queue", timeout=TIMEOUT).json()["queue_pending"]
        assert [entry[1] for entry in pending] == [ids[1], ids[3]]
        cleared = requests.post(f"{fake.url}/queue", json={"clear": True}, timeout=TIMEOUT)
        assert (cleared.status_code, cleared.text) == (200, "")
        requests.post(f"{fake.url}/interrupt", json={"prompt_id": ids[1]}, timeout=TIMEOUT)  # not running: no-op
        time.sleep(0.15)
        assert len(requests.get(f"{fake.url}/queue", timeout=TIMEOUT).json()["queue_running"]) == 1
        interrupted = requests.post(f"{fake.url}/interrupt", timeout=TIMEOUT)  # no body: global
        assert (interrupted.status_code, interrupted.text) == (200, recorded("interrupt_post.json")["body"]["_text"])
        observer.until_done(ids[0])
    finally:
        set_config(fake.url, step_delay_s=0.01)
        observer.close()
    statuses = [m["data"]["status"]["exec_info"]["queue_remaining"]
                for m in observer.messages if m.get("type") == "status"]
    assert statuses == [0, 1, 1, 2, 3, 4, 3, 1, 0]  # as in the recording's interrupt_and_queue
    assert history(fake, ids[0])["status"]["status_str"] == "error"
    assert [requests.get(f"{fake.url}/history/{i}", timeout=TIMEOUT).json() for i in ids[1:]] == [{}, {}, {}]

    entries = requests.get(f"{fake.url}/history", params={"max_items": 2}, timeout=TIMEOUT).json()
    assert len(entries) == 2 and list(entries)[-1] == ids[0]
    assert requests.post(f"{fake.url}/history", json={"delete": [ids[0]]}, timeout=TIMEOUT).text == ""
    assert requests.get(f"{fake.url}/history/{ids[0]}", timeout=TIMEOUT).json() == {}
    freed = requests.post(f"{fake.url}/free", json={"unload_models": True, "free_memory": True}, timeout=TIMEOUT)
    assert (freed.status_code, freed.text) == (200, recorded("free.json")["body"]["_text"])
    assert requests.post(f"{fake.url}/queue", data="not json", timeout=TIMEOUT).status_code == 500


def test_only_the_submitter_gets_execution_messages_and_reconnect_replaces_the_socket(
    fake: Fake, weights: Path,
) -> None:
    observer = WsClient(fake)
    anonymous = post_prompt(fake, {"1": _load("probe.png"), "2": {"class_type": "ImageInvert",
                                                                  "inputs": {"image": ["1", 0]}}, "3": _save("2")})
    wait_history(fake, anonymous["prompt_id"])
    assert history(fake, anonymous["prompt_id"])["prompt"][3] == {}

    set_config(fake.url, step_delay_s=0.05)
    first = WsClient(fake)
    try:
        answer = post_prompt(fake, _slow_graph(weights, 7, steps=8), first.client_id)
        first.until(lambda m: m.get("type") == "progress" and m["data"]["value"] == 2)
        second = WsClient(fake, client_id=first.client_id)
        messages = second.until_done(answer["prompt_id"])
        first.ws.settimeout(0.1)
        with pytest.raises(websocket.WebSocketTimeoutException):
            while True:
                first.recv()
    finally:
        set_config(fake.url, step_delay_s=0.01)
        first.close()
    # As recorded: the new socket gets status (with sid) and then executing {node} without a prompt_id.
    recorded_second = ws_scenario("reconnect_second_socket_same_clientId")
    assert [(m["type"], tuple(m["data"])) for m in recorded_second[:2]] == [("status", ("status", "sid")),
                                                                           ("executing", ("node",))]
    assert messages[0]["type"] == "status" and messages[0]["data"]["sid"] == first.client_id
    assert {"type": "executing", "data": {"node": "5"}} in messages[1:3]
    steps = [m["data"]["value"] for m in first.messages + messages if m.get("type") == "progress"]
    assert steps == list(range(1, 9))  # nothing after the reconnect reached the old socket
    second.close()
    observer.ws.settimeout(0.1)
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:
            observer.recv()
    assert {m["type"] for m in observer.messages} == {"status", "progress_state"}  # the anonymous job's states
    observer.close()


# ---------------------------------------------------------------------------------------------
# Faults, configuration, the main.py stand-in
# ---------------------------------------------------------------------------------------------


def test_dropped_websocket_mid_sampler_and_reconnect(fake: Fake, weights: Path) -> None:
    armed = set_fault(fake.url, "drop_ws", node_class="KSampler", step=2)
    assert armed["stage"] == "step" and get_faults(fake.url)["armed"][0]["kind"] == "drop_ws"
    set_config(fake.url, step_delay_s=0.06)  # time to reconnect before the job ends
    client = WsClient(fake)
    try:
        answer = post_prompt(fake, _slow_graph(weights, 11, steps=6), client.client_id)
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            while True:
                client.recv()
        assert [m["data"]["value"] for m in client.messages if m.get("type") == "progress"] == [1, 2]
        again = WsClient(fake, client_id=client.client_id)
        messages = again.until_done(answer["prompt_id"])
        again.close()
    finally:
        set_config(fake.url, step_delay_s=0.01)
    assert [m["data"]["value"] for m in messages if m.get("type") == "progress"][-1] == 6
    assert history(fake, answer["prompt_id"])["status"]["status_str"] == "success"
    assert get_faults(fake.url)["armed"] == []


def answers_json(url: str) -> bool:
    try:
        requests.get(url, timeout=TIMEOUT).json()
        return True
    except (requests.RequestException, ValueError):
        return False


def test_http_faults_and_config(fake: Fake) -> None:
    # Durations long enough that the first request always lands inside them; their end is waited for.
    set_fault(fake.url, "garbage_http", duration_s=2)
    garbage = requests.get(f"{fake.url}/system_stats", timeout=TIMEOUT)
    assert garbage.status_code == 200
    with pytest.raises(ValueError):
        garbage.json()
    wait_until(lambda: answers_json(f"{fake.url}/prompt"), 10, "garbage over")
    assert requests.get(f"{fake.url}/prompt", timeout=TIMEOUT).json()["exec_info"]["queue_remaining"] == 0

    set_fault(fake.url, "hang")
    with pytest.raises(requests.Timeout):
        requests.get(f"{fake.url}/prompt", timeout=0.2)
    clear_faults(fake.url)
    assert requests.get(f"{fake.url}/prompt", timeout=TIMEOUT).status_code == 200

    set_fault(fake.url, "refuse", duration_s=5)  # the listener closes just after this answer
    wait_until(lambda: not answers_json(f"{fake.url}/prompt"), 5, "refusing")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{fake.url}/prompt", timeout=TIMEOUT)
    wait_until(lambda: answers_json(f"{fake.url}/prompt"), 10, "listening again")
    assert requests.get(f"{fake.url}/prompt", timeout=TIMEOUT).status_code == 200

    with pytest.raises(RuntimeError, match="unknown config key"):
        set_config(fake.url, step_delay=1)
    with pytest.raises(RuntimeError, match="kind must be one of"):
        set_fault(fake.url, "explode")
    assert get_config(fake.url)["step_delay_s"] == 0.01


def test_comfyui_dir_main_py_starts_the_fake_and_die_exits_with_3(shim: Shim) -> None:
    comfy_dir, proc = shim.path, shim.proc
    assert (comfy_dir / "main.py").is_file() and (comfy_dir / "models" / "checkpoints").is_dir()
    assert proc.stdout is not None
    url = ""
    for line in proc.stdout:
        if match := re.search(r"To see the GUI go to: (http://\S+)", line):
            url = match.group(1)
            break
    stats = requests.get(f"{url}/system_stats", timeout=TIMEOUT).json()
    assert stats["system"]["argv"][:2] == ["main.py", "--listen"]  # and --use-sage-attention was ignored
    assert (comfy_dir / "temp").is_dir() and (comfy_dir / "models" / "vae_approx").is_dir()
    set_fault(url, "die", on="prompt")
    graph = {"1": _load("x.png"), "2": _save("1")}
    Image.new("RGB", (4, 4)).save(comfy_dir / "input" / "x.png")
    with contextlib.suppress(requests.ConnectionError):  # it may die before answering
        requests.post(f"{url}/prompt", json={"prompt": graph}, timeout=TIMEOUT)
    assert proc.wait(TIMEOUT) == 3
    assert "exiting with code 3" in proc.stdout.read()


# ---------------------------------------------------------------------------------------------
# Stand-in nodes
# ---------------------------------------------------------------------------------------------


def test_typed_wan_and_qwen_graphs_run_without_weights(fake: Fake) -> None:
    names = {"diffusion_models": "wan.safetensors", "text_encoders": "umt5.safetensors",
             "vae": "wan_vae.safetensors", "loras": "lightx2v.safetensors"}
    for folder, name in names.items():
        (fake.base / "models" / folder / name).write_bytes(b"")
    token = f"t{uuid.uuid4().hex[:8]}"
    try:
        i2v = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "wan"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_vae.safetensors"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["2", 0]}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
            "6": _load("probe.png"),
            "7": {"class_type": "WanImageToVideo", "inputs": {
                "positive": ["4", 0], "negative": ["5", 0], "vae": ["3", 0], "width": 100, "height": 64,
                "length": 33, "batch_size": 1, "start_image": ["6", 0]}},
            "8": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["1", 0], "lora_name": "lightx2v.safetensors", "strength_model": 1.0}},
            "9": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["8", 0], "shift": 8.0}},
            "10": {"class_type": "KSamplerAdvanced", "inputs": {
                "model": ["9", 0], "add_noise": "enable", "noise_seed": 5, "steps": 4, "cfg": 1.0,
                "sampler_name": "euler", "scheduler": "simple", "positive": ["7", 0], "negative": ["7", 1],
                "latent_image": ["7", 2], "start_at_step": 1, "end_at_step": 10000,
                "return_with_leftover_noise": "disable"}},
            "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
            "12": {"class_type": "CreateVideo", "inputs": {"images": ["11", 0], "fps": 16}},
            "13": {"class_type": "SaveVideo", "inputs": {
                "video": ["12", 0], "filename_prefix": f"{token}/clip", "format": "auto", "codec": "auto"}},
        }
        job = run_job(fake, i2v)
        assert [(m["data"]["value"], m["data"]["max"]) for m in job.messages if m.get("type") == "progress"] == [
            (1, 3), (2, 3), (3, 3)]  # steps 1..4 of 4: three sampler steps
        assert job.history["prompt"][2]["12"]["inputs"]["fps"] == 16.0  # validation converts in place
        with av.open(str(fake.base / "output" / token / "clip_00001_.mp4")) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height, sum(1 for _ in container.decode(stream))) == (96, 64, 33)

        qwen = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "qwen_image"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_vae.safetensors"}},
            "4": _load("probe.png"),
            "5": {"class_type": "ImageScale", "inputs": {
                "image": ["4", 0], "upscale_method": "lanczos", "width": 512, "height": 384, "crop": "center"}},
            "6": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {
                "clip": ["2", 0], "prompt": "blue", "vae": ["3", 0], "image1": ["5", 0]}},
            "7": {"class_type": "FluxKontextMultiReferenceLatentMethod", "inputs": {
                "conditioning": ["6", 0], "reference_latents_method": "index"}},
            "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["3", 0]}},
            "9": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.1}},
            "10": {"class_type": "CFGNorm", "inputs": {"model": ["9", 0], "strength": 1.0}},
            "11": {"class_type": "KSampler", "inputs": {
                "model": ["10", 0], "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": "simple", "positive": ["7", 0], "negative": ["7", 0], "latent_image": ["8", 0],
                "denoise": 1.0}},
            "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
            "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": f"{token}/edit"}},
        }
        job = run_job(fake, qwen)
        saved = job.history["outputs"]["13"]["images"][0]
        assert Image.open(fake.base / "output" / saved["subfolder"] / saved["filename"]).size == (512, 384)
    finally:
        for folder, name in names.items():
            (fake.base / "models" / folder / name).unlink()


def test_unimplemented_class_fails_at_run_time_and_interrupt_between_nodes(fake: Fake) -> None:
    graph = {"1": _load("probe.png"), "2": {"class_type": "ImageSharpen", "inputs": {
        "image": ["1", 0], "sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    job = run_job(fake, graph)  # valid for validation: the class is in the schemas
    error = next(m["data"] for m in job.messages if m.get("type") == "execution_error")
    assert (error["node_type"], error["exception_type"]) == ("ImageSharpen", "NotImplementedError")
    assert "ImageSharpen" in error["exception_message"]

    set_config(fake.url, node_delay_s=0.3)
    client = WsClient(fake)
    try:
        chain = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}},
                 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                 "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}, "4": _save("3")}
        answer = post_prompt(fake, chain, client.client_id)
        client.until(lambda m: m.get("type") == "executing" and m["data"]["node"] == "2")
        requests.post(f"{fake.url}/interrupt", timeout=TIMEOUT)
        messages = client.until_done(answer["prompt_id"])
    finally:
        set_config(fake.url, node_delay_s=0.0)
        client.close()
    # Node 2 does not look at the flag: it finishes, node 3 starts and is interrupted.
    assert [(m["type"], m["data"].get("node")) for m in messages[-5:-2]] == [
        ("progress_state", None), ("executing", "3"), ("execution_interrupted", None)]
    assert messages[-3]["data"]["node_id"] == "3" and messages[-3]["data"]["executed"] == ["1", "2"]
    assert [m[0] for m in history(fake, answer["prompt_id"])["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_interrupted"]


def test_node_stand_ins_accept_every_input_of_their_schema() -> None:
    from tests.fakes.comfyui.nodes import NODE_IMPLS
    from tests.fakes.comfyui.validate import Paths, Schemas

    schemas = Schemas(Paths.create("/nonexistent"))
    for class_type, fn in NODE_IMPLS.items():
        if class_type not in schemas:
            continue
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        inputs = schemas.static_input_types(class_type)
        names = {*(inputs.get("required") or {}), *(inputs.get("optional") or {})}
        assert names <= set(params), (class_type, names - set(params))
