"""Hostile and malformed requests: each is refused with a `validation` error naming the field,
within bounded time and memory, and never reaches ComfyUI or vLLM.

The worker under test is the real `Service` (and, for raw HTTP bodies, the runpod SDK's local
API running handler.py) with both backends pointed at a loopback listener that counts
connections and answers none, and with every weight the manifest names present. So a request
that got past validation would contact the listener and fail as `timeout`, never as
`validation`: "no connection was made" is what proves nothing reached a backend. URL inputs
go through the test's resolver and NetGuard, so none reaches the network either.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffbox.config import Settings
from diffbox.errors import JobError
from diffbox.service import Service
from diffbox.workflows import manifest, parse
from diffbox.workflows.raw import MAX_NODES
from tests.conftest import ComfyTarget, RunpodApi, start_runpod_api, worker_env
from tests.jobkit import INVERT_GRAPH
from tests.urlserver import NetGuard, Resolver

# -- images, good and bad --------------------------------------------------------------------


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def saved(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 0).save(buffer, fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height`: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _chunk(b"IEND", b""))


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(saved("GIF", mode="L"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen descriptor
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(saved("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


PNG = saved("PNG")
IMG = encoded(PNG)
BAD_IMAGES: list[tuple[str, str, str]] = [
    # (id, value, words in the message)
    ("not-base64", "@@not base64@@", "not valid base64"),
    ("truncated-base64", IMG[:-3], "not valid base64"),
    ("text-as-base64", encoded(b"hello, I am not an image"), "not a readable image"),
    ("truncated-png", encoded(PNG[: len(PNG) // 2]), "not a readable image"),
    ("png-bad-crc", encoded(PNG[:-5] + b"\0" + PNG[-4:]), "not a readable image"),
    ("zeros", encoded(b"\0" * 4096), "not a readable image"),
    ("svg", encoded(b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "not a readable image"),
    ("ico", encoded(saved("ICO", (16, 16))), "unsupported image format ICO"),
    ("bomb-png-10gp", encoded(png_claiming(100_000, 100_000)), "64 MP limit"),
    ("bomb-png-wide", encoded(png_claiming(2**31 - 1, 1)), "64 MP limit"),
    ("bomb-gif", encoded(gif_claiming(65535, 65535)), "64 MP limit"),
    ("bomb-jpeg", encoded(jpeg_claiming(65500, 65500)), "64 MP limit"),
    ("data-uri-text", "data:text/plain;base64," + IMG, "must have an image/* type, got 'text/plain'"),
    ("data-uri-html", "data:text/html;base64," + encoded(b"<script>"), "must have an image/* type"),
    ("data-uri-no-mime", "data:;base64," + IMG, "got 'none'"),
    ("data-uri-not-base64", "data:image/png," + IMG, "malformed data URI"),
    ("data-uri-svg", "data:image/svg+xml;base64," + encoded(b"<svg/>"), "not a readable image"),
    ("data-uri-params-flood", "data:image/png" + ";a" * 5_000_000, "malformed data URI"),
    ("data-uri-lying-png", "data:image/png;base64," + encoded(b"GIF89a garbage"), "not a readable image"),
    ("huge-base64", "A" * 40_000_000, "larger than the 25 MB limit"),
    ("huge-data-uri", "data:image/png;base64," + "A" * 40_000_000, "larger than the 25 MB limit"),
    ("file-url", "file:///etc/passwd", "file:// URLs are not accepted"),
    ("gopher-url", "gopher://127.0.0.1:6379/_FLUSHALL", "gopher:// URLs are not accepted"),
    ("http-url", "http://images.example/a.png", "only https:// URLs are accepted"),
    ("loopback-url", "https://127.0.0.1:8188/view?filename=x.png", "is not a public address"),
    ("metadata-url", "https://169.254.169.254/latest/meta-data/", "is not a public address"),
    ("private-url", "https://10.0.0.7/a.png", "is not a public address"),
    ("ipv6-loopback-url", "https://[::1]/a.png", "is not a public address"),
    ("unresolvable-url", "https://nowhere.invalid/a.png", "could not resolve"),
    ("credentials-url", "https://user:pw@images.example/a.png", "credentials in URLs"),
    ("s3-without-store", "s3://bucket/key.png", "s3:// inputs need S3 storage"),
]

I2V = {"workflow": "i2v", "image": IMG, "prompt": "a fox"}
SVI = {"workflow": "svi", "image": IMG, "prompt": "a fox", "clips": 2}
QWEN = {"workflow": "qwen_edit", "images": [IMG], "prompt": "make it blue"}
RAW = {"workflow": INVERT_GRAPH, "images": [{"name": "input.png", "image": IMG}]}
CHAT = {"workflow": "chat", "prompt": "hi"}
VLLM = {"prompt": "hi", "sampling_params": {"max_tokens": 8}}
BASES: dict[str, dict[str, Any]] = {"i2v": I2V, "svi": SVI, "qwen_edit": QWEN, "raw": RAW, "chat": CHAT,
                                    "vllm_worker": VLLM}


def w(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`base` with fields changed; a value of DROP removes the field."""
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()


def graph(**nodes: Any) -> dict[str, Any]:
    return {"workflow": nodes}


def node(class_type: str = "ImageInvert", **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def chain(n: int, cycle: bool = False) -> dict[str, Any]:
    nodes = {str(i): node(image=[str(i - 1), 0]) for i in range(1, n)}
    nodes["0"] = node("LoadImage", image="input.png") if not cycle else node(image=[str(n - 1), 0])
    return {"workflow": nodes}


CASES: list[tuple[str, Any, str]] = [
    # (id, input, what the message starts with or contains)
    ("null", None, "input: expected a JSON object, got NoneType"),
    ("string", "i2v", "input: expected a JSON object, got str"),
    ("number", 42, "input: expected a JSON object, got int"),
    ("list", [I2V], "input: expected a JSON object, got list"),
    ("bool", True, "input: expected a JSON object"),
    ("empty-object", {}, "workflow: required"),
    ("workflow-null", {"workflow": None}, "workflow: required"),
    ("workflow-number", {"workflow": 7}, "workflow: required"),
    ("workflow-list", {"workflow": ["i2v"]}, "workflow: required"),
    ("workflow-unknown", {"workflow": "t2v"}, "workflow: unknown workflow 't2v'"),
    ("workflow-case", {"workflow": "I2V"}, "workflow: unknown workflow"),
    ("workflow-huge", {"workflow": "x" * 5_000_000}, "workflow: unknown workflow 'xxxx"),
    ("workflow-raw-name", {"workflow": "raw"}, "workflow: Input should be a valid dictionary"),
    # i2v
    *[(f"i2v-image-{cid}", w(I2V, image=value), f"image: {words}") for cid, value, words in BAD_IMAGES],
    ("i2v-image-missing", w(I2V, image=DROP), "image: Field required"),
    ("i2v-image-empty", w(I2V, image=""), "image: String should have at least 1 character"),
    ("i2v-image-number", w(I2V, image=5), "image: Input should be a valid string"),
    ("i2v-image-list", w(I2V, image=[IMG]), "image: Input should be a valid string"),
    ("i2v-image-object", w(I2V, image={"url": "x"}), "image: Input should be a valid string"),
    ("i2v-end-image-bad", w(I2V, end_image="@@"), "end_image: not valid base64"),
    ("i2v-prompt-missing", w(I2V, prompt=DROP), "prompt: Field required"),
    ("i2v-prompt-empty", w(I2V, prompt=""), "prompt: String should have at least 1 character"),
    ("i2v-prompt-long", w(I2V, prompt="x" * 2001), "prompt: String should have at most 2000 characters"),
    ("i2v-prompt-huge", w(I2V, prompt="x" * 10_000_000), "prompt: String should have at most 2000"),
    ("i2v-prompt-number", w(I2V, prompt=123), "prompt: Input should be a valid string"),
    ("i2v-negative-long", w(I2V, negative_prompt="n" * 3000), "negative_prompt: String should have at most"),
    ("i2v-width-small", w(I2V, width=128), "width: must be a multiple of 16 between 256 and 1280"),
    ("i2v-width-odd", w(I2V, width=833), "width: must be a multiple of 16"),
    ("i2v-height-huge", w(I2V, height=10**12), "height: must be a multiple of 16"),
    ("i2v-width-float", w(I2V, width=832.5), "width: Input should be a valid integer"),
    ("i2v-width-text", w(I2V, width="wide"), "width: Input should be a valid integer"),
    ("i2v-frames-even", w(I2V, frames=80), "frames: must be 4n+1 between 5 and 161, got 80"),
    ("i2v-frames-many", w(I2V, frames=1001), "frames: must be 4n+1"),
    ("i2v-fps-zero", w(I2V, fps=0), "fps: Input should be greater than or equal to 1"),
    ("i2v-preset", w(I2V, preset="turbo"), "preset: Input should be 'fast' or 'quality'"),
    ("i2v-steps", w(I2V, steps=1000), "steps: Input should be less than or equal to 100"),
    ("i2v-cfg", w(I2V, cfg=-1), "cfg: Input should be greater than or equal to 0"),
    ("i2v-shift", w(I2V, shift=0), "shift: Input should be greater than 0"),
    ("i2v-seed-negative", w(I2V, seed=-1), "seed: Input should be greater than or equal to 0"),
    ("i2v-seed-huge", w(I2V, seed=2**64), "seed: Input should be less than or equal to"),
    ("i2v-unknown-field", w(I2V, promt="typo"), "promt: unknown field"),
    ("i2v-unknown-huge-key", w(I2V, **{"k" * 1_000_000: 1}), "'kkkk"),
    ("i2v-many-unknown", w(I2V, **{f"extra{i}": i for i in range(10_000)}), "and 9995 more"),
    ("i2v-output-store", w(I2V, output={"store": "ftp"}), "output.store: Input should be 's3' or 'inline'"),
    ("i2v-output-prefix-dotdot", w(I2V, output={"prefix": "../../etc"}), "output.prefix: String should match"),
    ("i2v-output-prefix-abs", w(I2V, output={"prefix": "/root"}), "output.prefix: String should match"),
    ("i2v-output-prefix-long", w(I2V, output={"prefix": "p" * 201}), "output.prefix: String should have at most"),
    ("i2v-output-unknown", w(I2V, output={"bucket": "other"}), "output.bucket: unknown field"),
    ("i2v-output-string", w(I2V, output="inline"), "output: Input should be a valid dictionary"),
    ("i2v-output-s3-unconfigured", w(I2V, output={"store": "s3"}), "output.store: 's3' needs S3 storage"),
    # svi
    ("svi-no-prompt", w(SVI, prompt=DROP, clips=DROP), "prompt: required: give prompt"),
    ("svi-both-prompts", w(SVI, prompts=["a"], clips=DROP), "prompt: give prompt or prompts, not both"),
    ("svi-prompts-empty", w(SVI, prompt=DROP, clips=DROP, prompts=[]), "prompts: List should have at least 1"),
    ("svi-prompts-many", w(SVI, prompt=DROP, clips=DROP, prompts=["a"] * 21), "prompts: List should have at most"),
    ("svi-prompts-number", w(SVI, prompt=DROP, clips=DROP, prompts=[1]), "prompts.0: Input should be a valid str"),
    ("svi-prompts-long", w(SVI, prompt=DROP, clips=DROP, prompts=["x" * 2001]), "prompts.0: String should have"),
    ("svi-clips-zero", w(SVI, clips=0), "clips: Input should be greater than or equal to 1"),
    ("svi-clips-many", w(SVI, clips=21), "clips: Input should be less than or equal to 20"),
    ("svi-clips-with-prompts", w(SVI, prompt=DROP, prompts=["a", "b"]), "clips: goes with prompt"),
    ("svi-frames", w(SVI, frames_per_clip=82), "frames_per_clip: must be 4n+1"),
    ("svi-motion-zero", w(SVI, motion_latents=0), "motion_latents: Input should be greater than or equal to 1"),
    ("svi-motion-overlap", w(SVI, frames_per_clip=17, motion_latents=4), "motion_latents: 4 overlaps 17 frames"),
    ("svi-image-bomb", w(SVI, image=encoded(png_claiming(50_000, 50_000))), "image: 64 MP limit"),
    ("svi-image-missing", w(SVI, image=DROP), "image: Field required"),
    ("svi-unknown", w(SVI, frames=81), "frames: unknown field"),
    # qwen_edit
    *[(f"qwen-images-{cid}", w(QWEN, images=[IMG, value]), f"images[1]: {words}")
      for cid, value, words in BAD_IMAGES if cid in ("not-base64", "bomb-png-10gp", "metadata-url", "zeros")],
    ("qwen-images-empty", w(QWEN, images=[]), "images: List should have at least 1 item"),
    ("qwen-images-many", w(QWEN, images=[IMG] * 4), "images: List should have at most 3 items"),
    ("qwen-images-string", w(QWEN, images=IMG), "images: Input should be a valid list"),
    ("qwen-images-numbers", w(QWEN, images=[1, 2]), "images.0: Input should be a valid string"),
    ("qwen-first-image-bad", w(QWEN, images=["@@"]), "images[0]: not valid base64"),
    ("qwen-model", w(QWEN, model="2512"), "model: Input should be '2511' or '2509'"),
    ("qwen-width", w(QWEN, width=1001), "width: must be a multiple of 8 between 256 and 2048"),
    ("qwen-height", w(QWEN, height=4096), "height: must be a multiple of 8"),
    ("qwen-steps", w(QWEN, steps=0), "steps: Input should be greater than or equal to 1"),
    ("qwen-cfg-text", w(QWEN, cfg="high"), "cfg: Input should be a valid number"),
    ("qwen-prompt-missing", w(QWEN, prompt=DROP), "prompt: Field required"),
    ("qwen-negative-long", w(QWEN, negative_prompt="n" * 2001), "negative_prompt: String should have at most"),
    ("qwen-unknown", w(QWEN, image=IMG), "image: unknown field"),
    # raw graphs
    *[(f"raw-image-{cid}", w(RAW, images=[{"name": "input.png", "image": value}]), f"images[0].image: {words}")
      for cid, value, words in BAD_IMAGES],
    ("raw-empty-graph", graph(), "workflow: the graph has no nodes"),
    ("raw-too-many-nodes", chain(MAX_NODES + 1000), f"workflow: {MAX_NODES + 1000} nodes, more than the 2000"),
    ("raw-self-cycle", graph(**{"1": node(image=["1", 0])}), "workflow.1: the graph has a cycle"),
    ("raw-two-cycle", graph(**{"1": node(image=["2", 0]), "2": node(image=["1", 0])}), "the graph has a cycle"),
    ("raw-long-cycle", chain(MAX_NODES, cycle=True), "the graph has a cycle"),
    ("raw-missing-link", graph(**{"1": node(image=["9", 0])}), "workflow.1.inputs.image: links to node '9'"),
    ("raw-missing-link-int", graph(**{"1": node(image=[9, 0])}), "workflow.1.inputs.image: links to node 9"),
    ("raw-node-number", graph(**{"1": 5}), "workflow.1: a node must be an object"),
    ("raw-node-list", graph(**{"1": ["ImageInvert"]}), "workflow.1: a node must be an object"),
    ("raw-no-class", graph(**{"1": {"inputs": {}}}), "workflow.1: missing class_type"),
    ("raw-class-number", graph(**{"1": {"class_type": 3, "inputs": {}}}), "workflow.1: missing class_type"),
    ("raw-inputs-list", graph(**{"1": {"class_type": "X", "inputs": []}}), "workflow.1.inputs: must be an object"),
    ("raw-huge-node-id", graph(**{"n" * 1_000_000: node(image=["9", 0])}), "workflow.'nnnn"),
    ("raw-graph-list", {"workflow": [node()]}, "workflow: required"),
    ("raw-name-dotdot", w(RAW, images=[{"name": "../evil.png", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-abs", w(RAW, images=[{"name": "/etc/cron.d/x", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-backslash", w(RAW, images=[{"name": "..\\x.png", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-dot", w(RAW, images=[{"name": "..", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-hidden", w(RAW, images=[{"name": ".bashrc", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-nul", w(RAW, images=[{"name": "a\0.png", "image": IMG}]), "images.0.name: must be a plain"),
    ("raw-name-empty", w(RAW, images=[{"name": "", "image": IMG}]), "images.0.name: String should have at least"),
    ("raw-name-long", w(RAW, images=[{"name": "n" * 300, "image": IMG}]), "images.0.name: String should have at most"),
    ("raw-name-number", w(RAW, images=[{"name": 1, "image": IMG}]), "images.0.name: Input should be a valid string"),
    ("raw-image-missing", w(RAW, images=[{"name": "input.png"}]), "images.0.image: Field required"),
    ("raw-image-empty", w(RAW, images=[{"name": "input.png", "image": ""}]), "images.0.image: String should have"),
    ("qwen-image-empty", w(QWEN, images=[""]), "images[0]: expected an image"),
    ("raw-image-entry-extra", w(RAW, images=[{"name": "a.png", "image": IMG, "type": "x"}]), "images.0.type: unknown"),
    ("raw-images-string", w(RAW, images="input.png"), "images: Input should be a valid list"),
    ("raw-images-strings", w(RAW, images=[IMG]), "images.0: Input should be a valid dictionary"),
    ("raw-images-many", w(RAW, images=[{"name": f"{i}.png", "image": IMG} for i in range(17)]),
     "images: List should have at most 16 items"),
    ("raw-unknown", w(RAW, imagez=[]), "imagez: unknown field"),
    # chat, our form
    ("chat-nothing", w(CHAT, prompt=DROP), "prompt: required: give messages (OpenAI format) or prompt"),
    ("chat-both", w(CHAT, messages=[{"role": "user", "content": "x"}]), "prompt: give messages or prompt, not both"),
    ("chat-prompt-empty", w(CHAT, prompt=""), "prompt: String should have at least 1 character"),
    ("chat-prompt-huge", w(CHAT, prompt="x" * 5_000_000), "prompt: String should have at most 100000"),
    ("chat-messages-empty", w(CHAT, prompt=DROP, messages=[]), "messages: List should have at least 1 item"),
    ("chat-messages-string", w(CHAT, prompt=DROP, messages="hi"), "messages: Input should be a valid list"),
    ("chat-messages-many", w(CHAT, prompt=DROP, messages=[{"role": "user", "content": "x"}] * 513),
     "messages: List should have at most 512"),
    ("chat-role", w(CHAT, prompt=DROP, messages=[{"role": "robot", "content": "x"}]),
     "messages.0.role: Input should be 'system', 'user' or 'assistant'"),
    ("chat-content-missing", w(CHAT, prompt=DROP, messages=[{"role": "user"}]), "messages.0.content: Field required"),
    ("chat-content-number", w(CHAT, prompt=DROP, messages=[{"role": "user", "content": 5}]),
     "messages.0.content: must be a string or a list"),
    ("chat-content-image", w(CHAT, prompt=DROP, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
     "messages.0.content: part 0.type: Input should be 'text'"),
    ("chat-content-huge", w(CHAT, prompt=DROP, messages=[{"role": "user", "content": "x" * 100_001}]),
     "messages.0.content: String should have at most 100000"),
    ("chat-message-extra", w(CHAT, prompt=DROP, messages=[{"role": "user", "content": "x", "tool_calls": []}]),
     "messages.0.tool_calls: unknown field"),
    ("chat-max-tokens-zero", w(CHAT, max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    ("chat-max-tokens-many", w(CHAT, max_tokens=4097), "max_tokens: Input should be less than or equal to 4096"),
    ("chat-max-tokens-text", w(CHAT, max_tokens="lots"), "max_tokens: Input should be a valid integer"),
    ("chat-temperature", w(CHAT, temperature=2.5), "temperature: Input should be less than or equal to 2"),
    ("chat-top-p", w(CHAT, top_p=0), "top_p: Input should be greater than 0"),
    ("chat-stop-many", w(CHAT, stop=["x"] * 17), "stop: at most 16 strings"),
    ("chat-stop-empty", w(CHAT, stop=[""]), "stop: at most 16 strings of 1 to 200 characters"),
    ("chat-stream", w(CHAT, stream="maybe"), "stream: Input should be a valid boolean"),
    ("chat-preset", w(CHAT, preset="jailbreak"), "preset: must be one of"),
    ("chat-preset-huge", w(CHAT, preset="p" * 1_000_000), "preset: must be one of"),
    ("chat-unknown", w(CHAT, model="gpt-4"), "model: unknown field"),
    ("chat-seed", w(CHAT, seed=-5), "seed: Input should be greater than or equal to 0"),
    # chat, the official vLLM worker's form
    ("vllm-max-tokens", w(VLLM, sampling_params={"max_tokens": 0}), "sampling_params.max_tokens: Input should be"),
    ("vllm-sampling-unknown", w(VLLM, sampling_params={"best_of": 3}), "sampling_params.best_of: unknown field"),
    ("vllm-sampling-string", w(VLLM, sampling_params="greedy"), "sampling_params: Input should be a valid dict"),
    ("vllm-n", w(VLLM, sampling_params={"n": 100}), "sampling_params.n: Input should be less than or equal to 16"),
    ("vllm-both", w(VLLM, messages=[{"role": "user", "content": "x"}]), "prompt: give messages or prompt, not both"),
    ("vllm-route", {"openai_route": "/v1/embeddings", "openai_input": {}}, "openai_route: must be one of"),
    ("vllm-route-huge", {"openai_route": "/" * 1_000_000}, "openai_route: must be one of"),
    ("vllm-route-and-prompt", {"openai_route": "/v1/completions", "prompt": "x"}, "openai_route: give openai_route"),
    ("vllm-input-alone", {"prompt": "x", "openai_input": {"model": "m"}}, "openai_input: goes with openai_route"),
    ("vllm-unknown", w(VLLM, temperature=0.1), "temperature: unknown field"),
]


# -- the worker under test -------------------------------------------------------------------


@dataclass
class Listener:
    """A loopback port that accepts and counts connections, then closes them unanswered."""

    url: str
    connections: int = 0


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    sock = socket.create_server(("127.0.0.1", 0))
    box = Listener(f"http://127.0.0.1:{sock.getsockname()[1]}")

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            box.connections += 1
            conn.close()

    threading.Thread(target=serve, name="counting-listener", daemon=True).start()
    yield box
    sock.close()


def no_dns(host: str, port: int) -> list[str]:
    raise OSError(f"test resolver: no DNS for {host}")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every weight the manifest names, as empty files: a valid request passes check_models."""
    models = tmp_path_factory.mktemp("models")
    for f in manifest.load().files.values():
        path = f.local_path(models)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return models


@pytest.fixture(scope="module")
def service(listener: Listener, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    service = Service(Settings(backends=["comfyui", "vllm"], comfyui_url=listener.url, vllm_url=listener.url,
                               models_dir=models_dir, work_dir=tmp_path_factory.mktemp("work"),
                               startup_timeout_s=0.3))
    resolver = Resolver()
    resolver.add("images.example", ["93.184.215.14"])
    service.url_policy = replace(service.url_policy, resolver=resolver)
    return service


def peak_rss_growth(run: Callable[[], Any]) -> tuple[Any, int]:
    """`run()`'s value, and how far this process's resident memory rose above where it started."""
    process = psutil.Process()
    start = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = run()
    finally:
        done.set()
        sampler.join()
    return value, peak - start


FIELD = re.compile(r"^[^\s:][^:]*: ")  # every message starts with the field it is about


def assert_refused(result: dict[str, Any], expected: str) -> dict[str, Any]:
    """A validation error; `expected` is "field: words in the message", or words alone."""
    error = result.get("error")
    assert isinstance(error, dict) and error["type"] == "validation", result
    message = error["message"]
    assert FIELD.match(message), message[:300]
    field, _, words = expected.rpartition(": ") if ": " in expected else ("", "", expected)
    assert message.startswith(f"{field}: " if field else ""), (expected, message[:300])
    assert words in message, (expected, message[:300])
    assert len(error["message"]) < 2000  # quoted values are cut short: messages are logged
    assert len(json.dumps(error.get("details"))) < 20_000
    return error


@pytest.mark.parametrize(("payload", "words"), [(p, m) for _, p, m in CASES], ids=[c[0] for c in CASES])
def test_refused_naming_the_field_before_any_backend_is_contacted(
    payload: Any, words: str, service: Service, listener: Listener, net_guard: NetGuard
) -> None:
    t0 = time.monotonic()
    result, grown = peak_rss_growth(lambda: _run(service, payload))
    assert time.monotonic() - t0 < 3
    assert_refused(result, words)
    # Inputs are bounded before they are decoded: no request costs much more than its own size.
    assert grown < 200_000_000, grown
    assert listener.connections == 0
    assert net_guard.attempts == []


def _run(service: Service, payload: Any) -> dict[str, Any]:
    return asyncio.run(service.run("hostile", payload))


@pytest.mark.parametrize(("policy", "payload", "expected"), [
    ({"allow_raw_workflows": False}, RAW, "workflow: 'raw' is not served by this endpoint"),
    ({"raw_node_allowlist": ["LoadImage", "SaveImage"]}, RAW, "workflow.2: node class ImageInvert is not allowed"),
    ({"raw_node_allowlist": ["LoadImage", "ImageInvert", "SaveImage"]},
     w(RAW, workflow={**INVERT_GRAPH, "x" * 500: node("PythonEval")}), "node class PythonEval is not allowed"),
    ({"workflows": ["qwen_edit"]}, I2V, "workflow: 'i2v' is not served by this endpoint"),
    ({"backends": ["comfyui"]}, CHAT, "workflow: 'chat' is not served by this endpoint"),
])
def test_endpoint_policies_refuse_before_any_backend_is_contacted(
    policy: dict[str, Any], payload: dict[str, Any], expected: str, service: Service, listener: Listener
) -> None:
    restricted = Service(service.settings.model_copy(update=policy))
    assert_refused(_run(restricted, payload), expected)
    assert listener.connections == 0


def test_the_corpus_is_large_and_covers_every_workflow() -> None:
    assert len(CASES) >= 100
    ids = [c[0] for c in CASES]
    for prefix in ("i2v-", "svi-", "qwen-", "raw-", "chat-", "vllm-"):
        assert sum(i.startswith(prefix) for i in ids) >= 9, prefix


# -- generated cases -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Not None: for an optional field that means "absent", which another rule may then ask about.
NOT_STRING = st.booleans() | st.integers() | st.floats() | st.lists(JSON, max_size=3) | \
    st.dictionaries(st.text(max_size=5), JSON, max_size=3)
# The fields of each form that must be a string (a list of strings for qwen_edit's images).
TEXT_FIELDS = {"i2v": ["image", "prompt"], "svi": ["image", "prompt"], "qwen_edit": ["prompt"], "chat": ["prompt"],
               "vllm_worker": ["prompt"]}
REQUIRED = {"i2v": ["image", "prompt"], "svi": ["image"], "qwen_edit": ["images", "prompt"], "raw": ["workflow"],
            "chat": ["prompt"], "vllm_worker": ["prompt"]}
GENERATED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refused_by_parse(payload: Any) -> JobError:
    with pytest.raises(JobError) as err:
        parse(payload)
    return err.value


@GENERATED
@given(form=st.sampled_from(sorted(BASES)), key=st.text(min_size=1, max_size=120), value=JSON)
def test_any_unknown_field_is_named(form: str, key: str, value: Any) -> None:
    base = BASES[form]
    workflow, _ = parse(base)
    if key in workflow.request.model_fields or key == "workflow":
        return
    error = refused_by_parse({**base, key: value})
    assert error.type == "validation"
    unknown = [d["field"] for d in error.details if d["message"] == "unknown field"]
    # Named as sent, or quoted and cut short when it is long or unprintable.
    assert unknown == [key] if len(key) <= 100 and key.isprintable() else unknown[0][0] in "'\"", unknown


@GENERATED
@given(form=st.sampled_from(sorted(TEXT_FIELDS)), data=st.data())
def test_a_text_field_of_another_type_is_named(form: str, data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(TEXT_FIELDS[form]))
    value = data.draw(NOT_STRING)
    error = refused_by_parse({**BASES[form], field: value})
    assert error.type == "validation"
    assert error.message.startswith(f"{field}: "), error.message


@GENERATED
@given(form=st.sampled_from(sorted(REQUIRED)), data=st.data())
def test_a_missing_required_field_is_named(form: str, data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(REQUIRED[form]))
    payload = {k: v for k, v in BASES[form].items() if k != field}
    error = refused_by_parse(payload)
    assert error.type == "validation"
    assert error.message.startswith(("workflow: ", f"{field}: ")), error.message


@GENERATED
@given(blob=st.binary(min_size=0, max_size=2048) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_an_image_are_refused(service: Service, listener: Listener, blob: bytes) -> None:
    for payload, fields in ((w(I2V, image=encoded(blob)), ("image: ",)),
                            (w(QWEN, images=[encoded(blob)]), ("images[0]: ",)),
                            (w(RAW, images=[{"name": "input.png", "image": encoded(blob)}]),
                             ("images[0].image: ", "images.0.image: "))):
        error = assert_refused(_run(service, payload), "")
        assert error["message"].startswith(fields), error["message"]
    assert listener.connections == 0


@GENERATED
@given(text=st.text(max_size=300))
def test_any_text_as_an_image_is_refused(service: Service, listener: Listener, text: str) -> None:
    # Whatever the text (URLs included: the resolver knows no names), it is refused as that field.
    error = assert_refused(_run(service, w(I2V, image=text)), "")
    assert error["message"].startswith("image: ")
    assert listener.connections == 0


@GENERATED
@given(payload=st.dictionaries(st.sampled_from(["workflow", "image", "images", "prompt", "messages", "width",
                                                "frames", "clips", "prompts", "output", "sampling_params",
                                                "openai_route"]) | st.text(max_size=10), JSON, max_size=6)
       | JSON)
def test_any_json_is_answered_with_the_error_contract(service: Service, listener: Listener, payload: Any) -> None:
    """Whatever JSON arrives, the worker answers with the error contract (never an exception),
    and a request parse refuses is refused with the same validation error, before any backend."""
    try:
        parse(payload)
    except JobError as expected:
        result = _run(service, payload)
        assert result == expected.to_dict()
        assert FIELD.match(expected.message), expected.message
    assert listener.connections == 0


# -- raw HTTP bodies, through the runpod SDK's local API ---------------------------------------


@pytest.fixture(scope="module")
def dead_api(listener: Listener, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunpodApi]:
    tmp = tmp_path_factory.mktemp("hostile-worker")
    api = start_runpod_api(worker_env(ComfyTarget(listener.url, None, is_fake=False), tmp / "work",
                                      DIFFBOX_STARTUP_TIMEOUT_S="0.5", DIFFBOX_MODELS_DIR=str(models_dir)),
                           tmp / "handler.log")
    yield api
    api.stop()


@pytest.mark.parametrize("body", [
    b"", b"not json", b"{", b'{"input": ', b"\xff\xfe\x00", b"[]", b"null", b'"input"', b"{}",
    b'{"input": {"workflow": "i2v"', b"{" * 100_000,
])
def test_bodies_that_are_not_a_job_are_refused_by_the_api(dead_api: RunpodApi, listener: Listener,
                                                          body: bytes) -> None:
    response = requests.post(f"{dead_api.url}/runsync", data=body, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert listener.connections == 0


@pytest.mark.parametrize(("job_input", "words"), [
    (None, "input: expected a JSON object"), ([1, 2], "input: expected a JSON object"),
    ("i2v", "input: expected a JSON object"), (7, "input: expected a JSON object"),
    *[(p, m) for cid, p, m in CASES if cid in (
        "empty-object", "i2v-image-bomb-png-10gp", "i2v-image-metadata-url", "svi-clips-many", "qwen-model",
        "raw-two-cycle", "raw-too-many-nodes", "raw-name-dotdot", "chat-role", "vllm-route")],
])
def test_refused_through_the_runpod_api(dead_api: RunpodApi, listener: Listener, job_input: Any, words: str) -> None:
    response = requests.post(f"{dead_api.url}/runsync", json={"input": job_input}, timeout=30)
    if response.status_code != 200:  # the SDK's own envelope check (input must be an object)
        assert 400 <= response.status_code < 500
    else:
        body = response.json()
        assert body["status"] == "FAILED", body
        assert_refused({"error": json.loads(body["error"])}, words)
    assert listener.connections == 0
