"""Node execution for the fake ComfyUI.

`PromptExecutor` is ComfyUI 0.3.64's execution.py reduced to what a client can observe: the
execution order (ExecutionList and its UX-friendly pick), the output cache keyed by input
signatures (a resubmission is cached; only the last prompt's entries survive), progress_state,
and the messages of a run. The node implementations work on Pillow images (an IMAGE is a list of
RGB images, a MASK a list of "L" images) and PyAV; model nodes are cheap stand-ins that carry
handles and latent shapes, so typed workflows run end to end without weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
from PIL import Image, ImageFilter, ImageOps, ImageSequence, PngImagePlugin

from diffbox.workflows.sizing import kontext_size

from .faults import FaultPoint
from .validate import (
    Paths,
    Schemas,
    annotated_path,
    full_model_path,
    full_type_name,
    get_input_info,
    is_link,
    vae_list,
)
from .validate import frame as tb_frame

SUCCESS = "success"
FAILURE = "failure"

# ---------------------------------------------------------------------------------------------
# Values flowing between nodes
# ---------------------------------------------------------------------------------------------

ImageList = list[Image.Image]


@dataclass
class Latent:
    """A LATENT's shape: pixel size (a multiple of 8), batch, latent frames and how many pixel
    frames each latent frame after the first stands for (4 for Wan/Hunyuan video VAEs)."""

    width: int
    height: int
    batch: int = 1
    frames: int = 1
    temporal: int = 1
    seed: int | None = None

    def decoded_frames(self) -> int:
        return (self.frames - 1) * self.temporal + 1

    def __str__(self) -> str:
        dims = [self.batch, 16 if self.temporal > 1 else 4]
        if self.frames > 1 or self.temporal > 1:
            dims.append(self.frames)
        dims += [self.height // 8, self.width // 8]
        return "{'samples': tensor(<" + ", ".join(str(d) for d in dims) + ">)}"


@dataclass
class Video:
    frames: ImageList
    fps: float

    def dimensions(self) -> tuple[int, int]:
        return self.frames[0].size

    def __str__(self) -> str:
        return f"<comfy_api.latest._input_impl.video_types.VideoFromComponents object at 0x{id(self):x}>"


_HANDLE_CLASSES = {
    "MODEL": "comfy.model_patcher.ModelPatcher",
    "CLIP": "comfy.sd.CLIP",
    "VAE": "comfy.sd.VAE",
    "CLIP_VISION": "comfy.clip_vision.ClipVisionModel",
    "UPSCALE_MODEL": "spandrel.ImageModelDescriptor",
    "CONTROL_NET": "comfy.controlnet.ControlNet",
    "SAMPLER": "comfy.samplers.KSAMPLER",
    "GUIDER": "comfy.samplers.CFGGuider",
}


@dataclass
class Handle:
    """An opaque model-ish value (MODEL, CLIP, VAE, CONDITIONING...)."""

    kind: str
    name: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.kind == "CONDITIONING":
            return "[[tensor(<conditioning>), {'pooled_output': tensor(<pooled>)}]]"
        cls = _HANDLE_CLASSES.get(self.kind, f"comfy.{self.kind.lower()}.{self.kind.title()}")
        return f"<{cls} object at 0x{id(self):x}>"


@dataclass
class Sigmas:
    steps: int

    def __str__(self) -> str:
        return f"tensor(<{self.steps + 1 if self.steps else 0} sigmas>)"


@dataclass
class Noise:
    seed: int | None

    def __str__(self) -> str:
        return f"<comfy_extras.nodes_custom_sampler.Noise_RandomNoise object at 0x{id(self):x}>"


class InterruptProcessingException(Exception):
    pass


InterruptProcessingException.__module__ = "comfy.model_management"


class SafetensorError(Exception):
    pass


SafetensorError.__module__ = "safetensors._safetensors_rust"


class DependencyCycleError(Exception):
    pass


DependencyCycleError.__module__ = "comfy_execution.graph"


class Host(Protocol):
    """What the executor needs from the server (ComfyUI's PromptServer)."""

    interrupt: threading.Event
    client_id: str | None

    def send(self, event: str, data: Any, sid: str | None) -> None: ...
    def send_bytes(self, payload: bytes, sid: str | None) -> None: ...
    def supports_preview_metadata(self, sid: str | None) -> bool: ...
    def set_last_node(self, node_id: str | None) -> None: ...
    def fault_point(self, point: FaultPoint) -> None: ...
    def config_value(self, name: str) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Tracebacks that look like ComfyUI's
# ---------------------------------------------------------------------------------------------

_EXEC_FRAMES = [
    tb_frame(
        "/comfyui/execution.py", 496, "execute",
        "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, "
        "input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)",
        "await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, "
        "pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)",
    ),
    tb_frame(
        "/comfyui/execution.py", 315, "get_output_data",
        "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
        "allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)",
        "await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
        "allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)",
    ),
    tb_frame(
        "/comfyui/execution.py", 289, "_async_map_node_over_list", "await process_inputs(input_dict, i)",
        "await process_inputs(input_dict, i)",
    ),
    tb_frame("/comfyui/execution.py", 277, "process_inputs", "result = f(**inputs)", "f(**inputs)"),
]
_V3_FRAMES = [
    tb_frame(
        "/comfyui/comfy_api/internal/__init__.py", 149, "wrapped_func",
        "return method(locked_class, **inputs)", "method(locked_class, **inputs)",
    ),
    tb_frame(
        "/comfyui/comfy_api/latest/_io.py", 1270, "EXECUTE_NORMALIZED",
        "to_return = cls.execute(*args, **kwargs)", "cls.execute(*args, **kwargs)",
    ),
]
_BLUR_FRAMES = [
    tb_frame(
        "/comfyui/comfy_extras/nodes_post_processing.py", 98, "execute",
        "padded_image = F.pad(image, (blur_radius,blur_radius,blur_radius,blur_radius), 'reflect')",
        "F.pad(image, (blur_radius,blur_radius,blur_radius,blur_radius), 'reflect')",
    ),
    tb_frame(
        "/opt/venv/lib/python3.11/site-packages/torch/nn/functional.py", 5849, "pad",
        "return torch._C._nn.pad(input, pad, mode, value)", "torch._C._nn.pad(input, pad, mode, value)",
    ),
]
_CHECKPOINT_FRAMES = [
    tb_frame(
        "/comfyui/nodes.py", 578, "load_checkpoint",
        'out = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, '
        'embedding_directory=folder_paths.get_folder_paths("embeddings"))',
        'comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, '
        'embedding_directory=folder_paths.get_folder_paths("embeddings"))',
    ),
    tb_frame(
        "/comfyui/comfy/sd.py", 1173, "load_checkpoint_guess_config",
        "sd, metadata = comfy.utils.load_torch_file(ckpt_path, return_metadata=True)",
        "comfy.utils.load_torch_file(ckpt_path, return_metadata=True)",
    ),
    tb_frame("/comfyui/comfy/utils.py", 75, "load_torch_file", "raise e"),
    tb_frame(
        "/comfyui/comfy/utils.py", 59, "load_torch_file",
        'with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:',
        'safetensors.safe_open(ckpt, framework="pt", device=device.type)',
    ),
]


def _with_frames(ex: BaseException, frames: list[str]) -> BaseException:
    ex.comfy_frames = frames  # type: ignore[attr-defined]
    return ex


# ---------------------------------------------------------------------------------------------
# current_inputs formatting (execution.format_value), with IMAGE printed as torch prints a tensor
# ---------------------------------------------------------------------------------------------

_EDGE = 3


def _pixel_values(images: ImageList) -> Callable[..., float]:
    data = [img.convert("RGB").tobytes() for img in images]
    sizes = [img.size for img in images]

    def value(b: int, y: int, x: int, c: int) -> float:
        w = sizes[b][0]
        raw = data[b][(y * w + x) * 3 + c]
        # torch holds float32 v/255; round-trip through float32 to print the same digits
        return float(struct.unpack("f", struct.pack("f", raw / 255.0))[0])

    return value


def _indices(n: int, summarize: bool) -> list[int | None]:
    if summarize and n > 2 * _EDGE:
        return [*range(_EDGE), None, *range(n - _EDGE, n)]
    return list(range(n))


def tensor_repr(images: ImageList) -> str:
    """str(tensor) of an IMAGE batch [B, H, W, 3] as PyTorch prints it (threshold 1000, 3 edge items)."""
    if not images:
        return "tensor([])"
    w, h = images[0].size
    shape = [len(images), h, w, 3]
    summarize = math.prod(shape) > 1000
    value = _pixel_values(images)
    picks = [_indices(n, summarize) for n in shape]
    shown = [
        value(b, y, x, c)
        for b in picks[0] if b is not None
        for y in picks[1] if y is not None
        for x in picks[2] if x is not None
        for c in picks[3] if c is not None
    ]
    # torch's _Formatter: integer mode when every value is whole; widths from the non-zero values.
    nonzero = [abs(v) for v in shown if v != 0]
    int_mode = all(v == math.ceil(v) for v in nonzero)
    if int_mode:
        texts = {v: f"{v:.0f}." for v in shown}
        width = max([len(f"{v:.0f}") + 1 for v in nonzero] or [1])
    else:
        sci = max(nonzero) / min(nonzero) > 1000.0 or max(nonzero) > 1.0e8 or min(nonzero) < 1.0e-4
        texts = {v: (f"{v:.4e}" if sci else f"{v:.4f}") for v in shown}
        width = max(len(texts[v]) for v in shown if v != 0)

    def fmt(v: float) -> str:
        t = texts[v]
        return " " * (width - len(t)) + t

    def render(index: tuple[int, ...], dim: int, indent: int) -> str:
        if dim == 3:
            items = [fmt(value(*index, c)) if c is not None else " ..." for c in picks[3]]
            per_line = max(1, (80 - indent) // (width + 2))
            lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
            return "[" + ("," + "\n" + " " * (indent + 1)).join(lines) + "]"
        parts = [render((*index, i), dim + 1, indent + 1) if i is not None else "..." for i in picks[dim]]
        return "[" + ("," + "\n" * (3 - dim) + " " * (indent + 1)).join(parts) + "]"

    return "tensor(" + render((), 0, 7) + ")"


def format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, Image.Image) for v in value):
        return tensor_repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Progress (comfy_execution.progress: ProgressRegistry + WebUIProgressHandler)
# ---------------------------------------------------------------------------------------------

Preview = tuple[str, Image.Image, int | None]


def encode_preview(preview: Preview) -> tuple[str, bytes]:
    image_type, image, max_size = preview
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_type, quality=95, compress_level=1)
    return image_type, buffer.getvalue()


class ProgressRegistry:
    def __init__(self, host: Host, prompt_id: str, client_id: str | None) -> None:
        self.host = host
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _send(self) -> None:
        nodes = {
            node_id: {
                "value": s["value"], "max": s["max"], "state": s["state"], "node_id": node_id,
                "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, s in self.nodes.items() if s["state"] != "pending"
        }
        self.host.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.client_id)

    def start(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="running", value=0.0, max=1.0)
        self._send()

    def update(self, node_id: str, value: int, total: int, preview: Preview | None) -> None:
        entry = self._entry(node_id)
        entry.update(state="running", value=value, max=total)
        self._send()
        if preview is not None and self.host.supports_preview_metadata(self.client_id):
            image_type, data = encode_preview(preview)
            metadata = json.dumps({
                "node_id": node_id, "prompt_id": self.prompt_id, "display_node_id": node_id,
                "parent_node_id": None, "real_node_id": node_id,
                "image_type": "image/png" if image_type == "PNG" else "image/jpeg",
            }).encode()
            header = struct.pack(">I", 4) + struct.pack(">I", len(metadata))
            self.host.send_bytes(header + metadata + data, self.client_id)

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._send()


# ---------------------------------------------------------------------------------------------
# The context a node implementation runs in
# ---------------------------------------------------------------------------------------------


class NodeContext:
    def __init__(self, run: _Run, node_id: str, class_type: str) -> None:
        self.run = run
        self.node_id = node_id
        self.class_type = class_type

    @property
    def paths(self) -> Paths:
        return self.run.executor.paths

    @property
    def schemas(self) -> Schemas:
        return self.run.executor.schemas

    @property
    def host(self) -> Host:
        return self.run.executor.host

    @property
    def prompt(self) -> dict[str, Any]:
        return self.run.prompt

    @property
    def extra_data(self) -> dict[str, Any]:
        return self.run.extra_data

    def state(self) -> dict[str, Any]:
        """Per-node-instance state, kept across prompts like ComfyUI's object cache."""
        return self.run.executor.objects.setdefault((self.node_id, self.class_type), {})

    def config(self, name: str) -> Any:
        return self.host.config_value(name)

    def check_interrupt(self) -> None:
        if self.host.interrupt.is_set():
            raise InterruptProcessingException()

    def sleep(self, seconds: float) -> None:
        """Work that notices an interrupt at once, as a sampler's model calls do."""
        if seconds <= 0:
            self.check_interrupt()
            return
        if self.host.interrupt.wait(seconds):
            raise InterruptProcessingException()

    def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        """ComfyUI's progress hook (main.hijack_progress): checks the interrupt, then reports."""
        self.check_interrupt()
        run = self.run
        run.registry.update(self.node_id, value, total, preview)
        self.host.send("progress", {"value": value, "max": total, "prompt_id": run.prompt_id, "node": self.node_id},
                       run.client_id)
        if preview is not None and not self.host.supports_preview_metadata(run.client_id):
            image_type, data = encode_preview(preview)
            type_num = 2 if image_type == "PNG" else 1
            self.host.send_bytes(struct.pack(">I", 1) + struct.pack(">I", type_num) + data, run.client_id)
        self.host.fault_point(FaultPoint("step", run.prompt_id, self.node_id, self.class_type, value))


NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]
NodeFn = Callable[..., NodeResult]
NODE_IMPLS: dict[str, NodeFn] = {}


def node(*names: str) -> Callable[[NodeFn], NodeFn]:
    def register(fn: NodeFn) -> NodeFn:
        for name in names:
            NODE_IMPLS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# Input signatures and IS_CHANGED (comfy_execution.caching.CacheKeySetInputSignature)
# ---------------------------------------------------------------------------------------------


def _is_changed(paths: Paths, class_type: str, inputs: dict[str, Any]) -> Any:
    if class_type in ("LoadImage", "LoadImageMask"):
        image = inputs.get("image")
        if not isinstance(image, str):
            return f"nan:{uuid.uuid4()}"
        try:
            return hashlib.sha256(annotated_path(paths, image).read_bytes()).hexdigest()
        except OSError:
            return f"nan:{uuid.uuid4()}"  # NaN in ComfyUI: never equal, never cached
    if class_type == "SaveImageWebsocket":
        return time.time()
    return False


def _signatures(paths: Paths, schemas: Schemas, prompt: dict[str, Any]) -> dict[str, str]:
    changed = {
        nid: _is_changed(paths, node.get("class_type", ""), node.get("inputs") or {}) for nid, node in prompt.items()
    }

    def immediate(node_id: str, order: dict[str, int]) -> list[Any]:
        node = prompt.get(node_id)
        if node is None:
            return [f"nan:{uuid.uuid4()}"]
        class_type = node["class_type"]
        signature: list[Any] = [class_type, changed[node_id]]
        if class_type in schemas and "UNIQUE_ID" in schemas.hidden(class_type).values():
            signature.append(node_id)
        inputs = node.get("inputs") or {}
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value):
                signature.append([key, ["ANCESTOR", order[value[0]], value[1]]])
            else:
                signature.append([key, value])
        return signature

    def ancestry(node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
        node = prompt.get(node_id)
        if node is None:
            return
        inputs = node.get("inputs") or {}
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor = inputs[key][0]
                if ancestor not in order:
                    ancestors.append(ancestor)
                    order[ancestor] = len(ancestors) - 1
                    ancestry(ancestor, ancestors, order)

    result = {}
    for node_id in prompt:
        ancestors: list[str] = []
        order: dict[str, int] = {}
        ancestry(node_id, ancestors, order)
        signature = [immediate(node_id, order)] + [immediate(a, order) for a in ancestors]
        result[node_id] = json.dumps(signature, default=repr)
    return result


# ---------------------------------------------------------------------------------------------
# ExecutionList (comfy_execution.graph): the order nodes run in
# ---------------------------------------------------------------------------------------------


class ExecutionList:
    def __init__(self, prompt: dict[str, Any], schemas: Schemas, cached: dict[str, tuple[Any, ...]]) -> None:
        self.prompt = prompt
        self.schemas = schemas
        self.outputs: dict[str, tuple[Any, ...]] = dict(cached)
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}
        self.staged: str | None = None

    def is_cached(self, node_id: str) -> bool:
        return node_id in self.outputs

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            inputs = self.prompt[unique_id].get("inputs") or {}
            class_inputs = self.schemas.static_input_types(self.prompt[unique_id]["class_type"])
            for name, value in inputs.items():
                if not is_link(value):
                    continue
                _, _, info = get_input_info(class_inputs, name)
                if info and info.get("lazy"):
                    continue  # lazy inputs are not evaluated by the fake's nodes
                from_id, socket = value
                if not self.is_cached(from_id):
                    stack.append(from_id)
                links.append((from_id, socket, unique_id))
        for from_id, socket, to_id in links:
            if not self.is_cached(from_id):
                self.add_node(from_id)
                if to_id not in self.blocking[from_id]:
                    self.blocking[from_id][to_id] = {}
                    self.block_count[to_id] += 1
                self.blocking[from_id][to_id][socket] = True

    def is_empty(self) -> bool:
        return not self.pending

    def _is_output(self, node_id: str) -> bool:
        return self.schemas.is_output(self.prompt[node_id]["class_type"])

    def stage(self) -> str:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            raise DependencyCycleError("Dependency cycle detected")
        self.staged = self._pick(ready)
        return self.staged

    def _pick(self, ready: list[str]) -> str:
        # ExecutionList.ux_friendly_pick_node: outputs first, then what unblocks an output soonest.
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(b) for b in self.blocking[blocked]):
                    return node_id
        return ready[0]

    def complete(self) -> None:
        node_id = self.staged
        assert node_id is not None
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]
        self.staged = None

    def cache_update(self, node_id: str, outputs: tuple[Any, ...]) -> None:
        self.outputs[node_id] = outputs


# ---------------------------------------------------------------------------------------------
# PromptExecutor (execution.PromptExecutor)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run:
    executor: PromptExecutor
    prompt: dict[str, Any]
    prompt_id: str
    extra_data: dict[str, Any]
    client_id: str | None
    registry: ProgressRegistry
    signatures: dict[str, str]
    execution_list: ExecutionList
    executed: list[str] = field(default_factory=list)


class PromptExecutor:
    """Runs one prompt at a time on the execution thread; its caches outlive the prompt."""

    def __init__(self, host: Host, schemas: Schemas, paths: Paths) -> None:
        self.host = host
        self.schemas = schemas
        self.paths = paths
        self.outputs_cache: dict[str, tuple[Any, ...]] = {}
        self.ui_cache: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.success = True
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {"outputs": {}, "meta": {}}
        self._client_id: str | None = None

    def reset(self) -> None:
        """POST /free {"free_memory": true}: a fresh executor, nothing cached."""
        self.outputs_cache.clear()
        self.ui_cache.clear()
        self.objects.clear()

    def _add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self._client_id is not None or broadcast:
            self.host.send(event, data, self._client_id)

    def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any],
                execute_outputs: list[str]) -> None:
        self.host.interrupt.clear()
        self._client_id = extra_data.get("client_id") if "client_id" in extra_data else None
        self.host.client_id = self._client_id
        self.status_messages = []
        self.success = True
        self._add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        signatures = _signatures(self.paths, self.schemas, prompt)
        used = set(signatures.values())
        # The classic cache keeps only what the current prompt could use.
        for cache in (self.outputs_cache, self.ui_cache):
            for key in [k for k in cache if k not in used]:
                del cache[key]
        live_objects = {(nid, node.get("class_type")) for nid, node in prompt.items()}
        for stale in [k for k in self.objects if k not in live_objects]:
            del self.objects[stale]

        cached = {nid: self.outputs_cache[sig] for nid, sig in signatures.items() if sig in self.outputs_cache}
        self._add_message("execution_cached", {"nodes": list(cached), "prompt_id": prompt_id}, broadcast=False)
        self.host.fault_point(FaultPoint("prompt", prompt_id))

        run = _Run(
            executor=self, prompt=prompt, prompt_id=prompt_id, extra_data=extra_data, client_id=self._client_id,
            registry=ProgressRegistry(self.host, prompt_id, self._client_id), signatures=signatures,
            execution_list=ExecutionList(prompt, self.schemas, cached),
        )
        current_outputs = list(prompt)
        for node_id in execute_outputs:
            run.execution_list.add_node(node_id)

        failed = False
        while not run.execution_list.is_empty():
            try:
                node_id = run.execution_list.stage()
            except DependencyCycleError as cycle:
                node_id = next(iter(run.execution_list.pending))
                self._handle_error(run, current_outputs, {
                    "node_id": node_id, "exception_message": "Dependency cycle detected",
                    "exception_type": full_type_name(DependencyCycleError), "traceback": [], "current_inputs": [],
                }, cycle)
                self.success = False
                failed = True
                break
            result, error, ex = self._execute_node(run, node_id)
            self.success = result != FAILURE
            if result == FAILURE:
                assert error is not None and ex is not None
                self._handle_error(run, current_outputs, error, ex)
                failed = True
                break
            run.execution_list.complete()
        if not failed:
            self._add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)

        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id, sig in signatures.items():
            entry = self.ui_cache.get(sig)
            if entry is not None:
                outputs[node_id] = entry["output"]
                meta[node_id] = entry["meta"]
        self.history_result = {"outputs": outputs, "meta": meta}
        self.host.set_last_node(None)

    def _handle_error(
        self, run: _Run, current_outputs: list[str], error: dict[str, Any], ex: BaseException,
    ) -> None:
        node_id = error["node_id"]
        class_type = run.prompt[node_id]["class_type"]
        if isinstance(ex, InterruptProcessingException):
            self._add_message("execution_interrupted", {
                "prompt_id": run.prompt_id, "node_id": node_id, "node_type": class_type, "executed": list(run.executed),
            }, broadcast=True)
            return
        self._add_message("execution_error", {
            "prompt_id": run.prompt_id,
            "node_id": node_id,
            "node_type": class_type,
            "executed": list(run.executed),
            "exception_message": error["exception_message"],
            "exception_type": error["exception_type"],
            "traceback": error["traceback"],
            "current_inputs": error["current_inputs"],
            "current_outputs": list(current_outputs),
        }, broadcast=False)

    def _input_data(self, run: _Run, node_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        node = run.prompt[node_id]
        class_type = node["class_type"]
        class_inputs = self.schemas.static_input_types(class_type)
        values: dict[str, Any] = {}
        shown: dict[str, Any] = {}
        for name, raw in (node.get("inputs") or {}).items():
            _, category, _ = get_input_info(class_inputs, name)
            if is_link(raw):
                source = run.execution_list.outputs.get(raw[0])
                value = source[int(raw[1])] if source is not None and int(raw[1]) < len(source) else None
            elif category is not None:
                value = raw
            else:
                continue
            if category in ("required", "optional"):
                values[name] = value
            shown[name] = [format_value(value)]
        if not self.schemas.is_v3(class_type):
            # v1 nodes get their hidden inputs with the others, and they show in current_inputs.
            for name, kind in self.schemas.hidden(class_type).items():
                if kind == "PROMPT":
                    shown[name] = [format_value(run.prompt)]
                elif kind == "EXTRA_PNGINFO":
                    shown[name] = [format_value(run.extra_data.get("extra_pnginfo"))]
                elif kind == "UNIQUE_ID":
                    shown[name] = [node_id]
        return values, shown

    def _execute_node(self, run: _Run, node_id: str) -> tuple[str, dict[str, Any] | None, BaseException | None]:
        host = self.host
        class_type = run.prompt[node_id]["class_type"]
        sig = run.signatures[node_id]
        if sig in self.outputs_cache:
            if run.client_id is not None:
                cached_ui = self.ui_cache.get(sig) or {}
                host.send("executed", {
                    "node": node_id, "display_node": node_id, "output": cached_ui.get("output"),
                    "prompt_id": run.prompt_id,
                }, run.client_id)
            run.registry.finish(node_id)
            run.execution_list.cache_update(node_id, self.outputs_cache[sig])
            return SUCCESS, None, None

        run.registry.start(node_id)
        values, shown = self._input_data(run, node_id)
        if run.client_id is not None:
            host.set_last_node(node_id)
            host.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                      run.client_id)
        try:
            host.fault_point(FaultPoint("node", run.prompt_id, node_id, class_type))
            ctx = NodeContext(run, node_id, class_type)
            ctx.check_interrupt()  # nodes.before_node_execution()
            delay = float(host.config_value("node_delay_s"))
            if delay > 0:
                time.sleep(delay)  # a node's own work does not look at the interrupt flag
            impl = NODE_IMPLS.get(class_type)
            if impl is None:
                raise NotImplementedError(f"The fake ComfyUI has no implementation of node class {class_type}")
            outputs, ui = impl(ctx, **values)
        except InterruptProcessingException as iex:
            return FAILURE, {"node_id": node_id}, iex
        except Exception as ex:
            return FAILURE, {
                "node_id": node_id,
                "exception_message": f"{ex}\n",
                "exception_type": full_type_name(type(ex)),
                "traceback": self._traceback(ex, class_type),
                "current_inputs": shown,
            }, ex

        if ui:
            entry = {
                "meta": {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id},
                "output": ui,
            }
            self.ui_cache[sig] = entry
            if run.client_id is not None:
                host.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                       "prompt_id": run.prompt_id}, run.client_id)
        self.outputs_cache[sig] = outputs
        run.execution_list.cache_update(node_id, outputs)
        run.registry.finish(node_id)
        run.executed.append(node_id)
        return SUCCESS, None, None

    def _traceback(self, ex: BaseException, class_type: str) -> list[str]:
        frames = list(_EXEC_FRAMES)
        if self.schemas.is_v3(class_type):
            frames += _V3_FRAMES
        own = getattr(ex, "comfy_frames", None)
        if own is not None:
            return frames + list(own)
        tb = traceback.extract_tb(ex.__traceback__)
        # Drop the executor's own frames: the node's frames stand where ComfyUI's node code would.
        here = os.path.abspath(__file__)
        start = next((i for i, f in enumerate(tb) if f.filename == here and f.name == "_execute_node"), -1)
        return frames + traceback.format_list(tb[start + 1:])


# ---------------------------------------------------------------------------------------------
# File helpers shared by loaders and savers
# ---------------------------------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    """An empty file stands in for weights; a non-empty .safetensors must have a sane header,
    so a corrupt file fails at run time as in ComfyUI (safetensors' own messages)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorError("Error while deserializing header: header too small")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise SafetensorError("Error while deserializing header: header too large")
        if 8 + n > size:
            raise SafetensorError("Error while deserializing header: invalid header length")
        header = f.read(n)
    try:
        text = header.decode()
    except UnicodeDecodeError as e:
        raise SafetensorError("Error while deserializing header: invalid UTF-8 in header") from e
    if not text.startswith("{"):
        raise SafetensorError("Error while deserializing header: invalid start character in header, must be `{`")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise SafetensorError(f"Error while deserializing header: invalid JSON in header: {e}") from e


def _model_file(ctx: NodeContext, folder: str, name: str) -> Path:
    path = full_model_path(ctx.paths, folder, name)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")
    _check_safetensors(path)
    return path


def save_path(paths: Paths, output_dir: Path, filename_prefix: str, width: int = 0, height: int = 0,
              ) -> tuple[Path, str, int, str]:
    """folder_paths.get_save_image_path: (folder, file prefix, next counter, subfolder)."""
    if "%" in filename_prefix:
        now = time.localtime()
        for key, val in (("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.tm_year)),
                         ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                         ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                         ("%second%", f"{now.tm_sec:02}")):
            filename_prefix = filename_prefix.replace(key, val)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    out = str(output_dir)
    full_folder = os.path.join(out, subfolder)
    if os.path.commonpath((out, os.path.abspath(full_folder))) != out:
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_folder)}"
            f"\n         output_dir: {out}"
            f"\n         commonpath: {os.path.commonpath((out, os.path.abspath(full_folder)))}"
        )

    def counter_of(name: str) -> tuple[int, str]:
        prefix_len = len(filename)
        prefix = name[:prefix_len + 1]
        try:
            digits = int(name[prefix_len + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, prefix

    try:
        matches = [counter_of(n) for n in os.listdir(full_folder)]
        counter = max(d for d, p in matches
                      if os.path.normcase(p[:-1]) == os.path.normcase(filename) and p[-1:] == "_") + 1
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(full_folder, exist_ok=True)
        counter = 1
    return Path(full_folder), filename, counter, subfolder


def _pnginfo(ctx: NodeContext) -> PngImagePlugin.PngInfo | None:
    if ctx.config("disable_metadata"):
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(ctx.prompt))
    for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def _require_images(images: Any) -> ImageList:
    if not isinstance(images, list) or not images:
        raise ValueError("expected a non-empty IMAGE batch")
    return images


# ---------------------------------------------------------------------------------------------
# Image nodes
# ---------------------------------------------------------------------------------------------

_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "bislerp": Image.Resampling.BICUBIC,
}


def common_upscale(image: Image.Image, width: int, height: int, method: str, crop: str) -> Image.Image:
    """comfy.utils.common_upscale: optional centre crop to the target aspect, then resize."""
    old_w, old_h = image.size
    if crop == "center":
        old_aspect = old_w / old_h
        new_aspect = width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        image = image.crop((x, y, old_w - x, old_h - y))
    return image.resize((max(1, width), max(1, height)), _RESAMPLE.get(method, Image.Resampling.BILINEAR))


@node("LoadImage")
def load_image(ctx: NodeContext, image: str) -> NodeResult:
    path = annotated_path(ctx.paths, image)
    img = Image.open(path)
    frames: ImageList = []
    masks: ImageList = []
    size = None
    for frame in ImageSequence.Iterator(img):
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        if "A" in frame.getbands():
            mask = ImageOps.invert(frame.getchannel("A"))
        elif frame.mode == "P" and "transparency" in frame.info:
            mask = ImageOps.invert(frame.convert("RGBA").getchannel("A"))
        else:
            mask = Image.new("L", (64, 64), 0)
        frames.append(rgb)
        masks.append(mask)
    if img.format == "MPO":
        frames, masks = frames[:1], masks[:1]
    return (frames, masks), None


@node("LoadImageMask")
def load_image_mask(ctx: NodeContext, image: str, channel: str) -> NodeResult:
    img = ImageOps.exif_transpose(Image.open(annotated_path(ctx.paths, image)))
    band = channel[0].upper()
    if img.getbands() != ("R", "G", "B", "A"):
        if img.mode == "I":
            img = img.point(lambda v: v * (1 / 255))
        img = img.convert("RGBA")
    if band in img.getbands():
        mask = img.getchannel(band)
        if band == "A":
            mask = ImageOps.invert(mask)
    else:
        mask = Image.new("L", (64, 64), 0)
    return ([mask],), None


@node("ImageInvert")
def image_invert(ctx: NodeContext, image: ImageList) -> NodeResult:
    return ([ImageOps.invert(im.convert("RGB")) for im in image],), None


@node("EmptyImage")
def empty_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1, color: int = 0) -> NodeResult:
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return ([Image.new("RGB", (width, height), rgb) for _ in range(batch_size)],), None


@node("ImageAddNoise")
def image_add_noise(ctx: NodeContext, image: ImageList, seed: int, strength: float) -> NodeResult:
    # Uniform noise blended in where ComfyUI adds Gaussian noise: seeded, a new pattern per frame.
    rng = random.Random(seed)
    out = []
    for im in image:
        noise = Image.frombytes("RGB", im.size, rng.randbytes(im.size[0] * im.size[1] * 3))
        out.append(Image.blend(im.convert("RGB"), noise, min(max(strength, 0.0), 1.0)))
    return (out,), None


@node("ImageScale")
def image_scale(ctx: NodeContext, image: ImageList, upscale_method: str, width: int, height: int, crop: str,
                ) -> NodeResult:
    if width == 0 and height == 0:
        return (image,), None
    out = []
    for im in image:
        w, h = width, height
        if w == 0:
            w = max(1, round(im.size[0] * h / im.size[1]))
        elif h == 0:
            h = max(1, round(im.size[1] * w / im.size[0]))
        out.append(common_upscale(im, w, h, upscale_method, crop))
    return (out,), None


@node("ImageScaleBy")
def image_scale_by(ctx: NodeContext, image: ImageList, upscale_method: str, scale_by: float) -> NodeResult:
    out = [
        common_upscale(im, round(im.size[0] * scale_by), round(im.size[1] * scale_by), upscale_method, "disabled")
        for im in image
    ]
    return (out,), None


@node("ImageScaleToTotalPixels")
def image_scale_to_total_pixels(ctx: NodeContext, image: ImageList, upscale_method: str, megapixels: float,
                                ) -> NodeResult:
    total = int(megapixels * 1024 * 1024)
    out = []
    for im in image:
        scale = math.sqrt(total / (im.size[0] * im.size[1]))
        out.append(common_upscale(im, round(im.size[0] * scale), round(im.size[1] * scale), upscale_method, "disabled"))
    return (out,), None


@node("FluxKontextImageScale")
def flux_kontext_image_scale(ctx: NodeContext, image: ImageList) -> NodeResult:
    w, h = image[0].size
    tw, th = kontext_size(w / h)
    return ([common_upscale(im, tw, th, "lanczos", "center") for im in image],), None


@node("ImageCrop")
def image_crop(ctx: NodeContext, image: ImageList, width: int, height: int, x: int, y: int) -> NodeResult:
    out = []
    for im in image:
        x0 = min(x, im.size[0] - 1)
        y0 = min(y, im.size[1] - 1)
        out.append(im.crop((x0, y0, min(x0 + width, im.size[0]), min(y0 + height, im.size[1]))))
    return (out,), None


@node("RepeatImageBatch")
def repeat_image_batch(ctx: NodeContext, image: ImageList, amount: int) -> NodeResult:
    return ([im.copy() for _ in range(amount) for im in image],), None


@node("ImageBatch")
def image_batch(ctx: NodeContext, image1: ImageList, image2: ImageList) -> NodeResult:
    size = image1[0].size
    second = [im if im.size == size else common_upscale(im, size[0], size[1], "bilinear", "center") for im in image2]
    return (list(image1) + second,), None


@node("ImageFromBatch")
def image_from_batch(ctx: NodeContext, image: ImageList, batch_index: int, length: int) -> NodeResult:
    batch_index = min(len(image) - 1, batch_index)
    length = min(len(image) - batch_index, length)
    return (image[batch_index:batch_index + length],), None


@node("ImageBatchExtendWithOverlap")
def image_batch_extend_with_overlap(ctx: NodeContext, source_images: ImageList, overlap: int, overlap_side: str,
                                    overlap_mode: str, new_images: ImageList | None = None) -> NodeResult:
    """KJNodes' join of two clips (nodes/image_nodes.py at the pinned commit): the last `overlap`
    frames of the source and the first of the new images become one cross-fade. The fake blends
    linearly for every mode but `cut`."""
    if overlap > len(source_images):
        return (source_images, source_images, source_images), None
    if new_images is None:
        return (source_images, source_images[-overlap:], [Image.new("RGB", (64, 64))]), None
    if source_images[0].size != new_images[0].size:
        raise ValueError(f"Source and new images must have the same shape: {source_images[0].size} vs "
                         f"{new_images[0].size}")
    if overlap_mode == "cut":
        extended = (list(source_images) + list(new_images[overlap:]) if overlap_side == "new_images"
                    else list(source_images[:-overlap]) + list(new_images))
    else:
        tail, head = source_images[-overlap:], new_images[:overlap]
        src, dst = (tail, head) if overlap_side == "source" else (head, tail)
        blended = [Image.blend(a, b, (i + 1) / (overlap + 1)) for i, (a, b) in enumerate(zip(src, dst, strict=True))]
        extended = list(source_images[:-overlap]) + blended + list(new_images[overlap:])
    return (source_images, source_images[-overlap:], extended), None


@node("GetImageRangeFromBatch")
def get_image_range_from_batch(ctx: NodeContext, start_index: int, num_frames: int, images: ImageList | None = None,
                               masks: ImageList | None = None, **_: Any) -> NodeResult:
    picked = (images or [])[start_index:start_index + num_frames] if start_index >= 0 else (images or [])[start_index:]
    picked_masks = (masks or [])[start_index:start_index + num_frames] if masks else None
    return (picked, picked_masks), None


@node("ImageBlur")
def image_blur(ctx: NodeContext, image: ImageList, blur_radius: int, sigma: float) -> NodeResult:
    if blur_radius == 0:
        return (image,), None
    w, h = image[0].size
    shape = f"[{len(image)}, 3, {h}, {w}]"
    # torch's reflect padding needs the pad smaller than each side, width checked first
    if blur_radius >= w:
        raise _with_frames(RuntimeError(
            "Argument #4: Padding size should be less than the corresponding input dimension, but got: "
            f"padding ({blur_radius}, {blur_radius}) at dimension 3 of input {shape}"
        ), _BLUR_FRAMES)
    if blur_radius >= h:
        raise _with_frames(RuntimeError(
            "Argument #6: Padding size should be less than the corresponding input dimension, but got: "
            f"padding ({blur_radius}, {blur_radius}) at dimension 2 of input {shape}"
        ), _BLUR_FRAMES)
    return ([im.filter(ImageFilter.GaussianBlur(radius=sigma)) for im in image],), None


@node("UpscaleModelLoader")
def upscale_model_loader(ctx: NodeContext, model_name: str) -> NodeResult:
    _model_file(ctx, "upscale_models", model_name)
    match = re.search(r"(?:^|[^0-9])([2-8])x|x([2-8])(?:[^0-9]|$)", model_name.lower())
    scale = int(next(g for g in match.groups() if g)) if match else 2
    return (Handle("UPSCALE_MODEL", model_name, {"scale": scale}),), None


@node("ImageUpscaleWithModel")
def image_upscale_with_model(ctx: NodeContext, upscale_model: Handle, image: ImageList) -> NodeResult:
    scale = int(upscale_model.detail.get("scale", 2))
    tile, overlap = 512, 32
    w, h = image[0].size
    per_image = math.ceil(h / (tile - overlap)) * math.ceil(w / (tile - overlap))
    total = per_image * len(image)
    delay = float(ctx.config("step_delay_s"))
    step = 0
    out = []
    for im in image:
        for _ in range(per_image):
            ctx.sleep(delay)
            step += 1
            ctx.progress(step, total)
        out.append(im.resize((w * scale, h * scale), Image.Resampling.BICUBIC))
    return (out,), None


# ---------------------------------------------------------------------------------------------
# Saving nodes
# ---------------------------------------------------------------------------------------------


def _save_pngs(ctx: NodeContext, images: ImageList, prefix: str, output_dir: Path, kind: str, compress_level: int,
               ) -> list[dict[str, str]]:
    w, h = images[0].size
    folder, filename, counter, subfolder = save_path(ctx.paths, output_dir, prefix, w, h)
    metadata = _pnginfo(ctx)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        image.save(folder / name, pnginfo=metadata, compress_level=compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


@node("SaveImage")
def save_image(ctx: NodeContext, images: ImageList, filename_prefix: str = "ComfyUI") -> NodeResult:
    results = _save_pngs(ctx, _require_images(images), filename_prefix, ctx.paths.output, "output", 4)
    return (), {"images": results}


@node("PreviewImage")
def preview_image(ctx: NodeContext, images: ImageList) -> NodeResult:
    state = ctx.state()
    if "prefix_append" not in state:
        state["prefix_append"] = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    prefix = "ComfyUI" + state["prefix_append"]
    results = _save_pngs(ctx, _require_images(images), prefix, ctx.paths.temp, "temp", 1)
    return (), {"images": results}


@node("SaveImageWebsocket")
def save_image_websocket(ctx: NodeContext, images: ImageList) -> NodeResult:
    for step, image in enumerate(images):
        ctx.progress(step, len(images), ("PNG", image, None))
    return (), {}


@node("SaveAnimatedWEBP")
def save_animated_webp(ctx: NodeContext, images: ImageList, fps: float, filename_prefix: str = "ComfyUI",
                       lossless: bool = True, quality: int = 80, method: str = "default") -> NodeResult:
    images = _require_images(images)
    folder, filename, counter, subfolder = save_path(ctx.paths, ctx.paths.output, filename_prefix, *images[0].size)
    name = f"{filename}_{counter:05}_.webp"
    methods = {"default": 4, "fastest": 0, "slowest": 6}
    images[0].save(folder / name, save_all=True, duration=int(1000.0 / fps), append_images=images[1:],
                   lossless=lossless, quality=quality, method=methods.get(method, 4))
    return (), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}],
                "animated": [len(images) != 1]}


@node("SaveAnimatedPNG")
def save_animated_png(ctx: NodeContext, images: ImageList, fps: float, compress_level: int,
                      filename_prefix: str = "ComfyUI") -> NodeResult:
    images = _require_images(images)
    folder, filename, counter, subfolder = save_path(ctx.paths, ctx.paths.output, filename_prefix, *images[0].size)
    name = f"{filename}_{counter:05}_.png"
    images[0].save(folder / name, pnginfo=_pnginfo(ctx), compress_level=compress_level, save_all=True,
                   duration=int(1000.0 / fps), append_images=images[1:])
    return (), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": [True]}


def _encode_video(path: Path, frames: ImageList, fps: float, codec: str, pix_fmt: str,
                  options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> None:
    with av.open(str(path), mode="w", options=container_options or {}) as output:
        stream = output.add_stream(codec, rate=Fraction(round(fps * 1000), 1000))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pix_fmt
        if options:
            stream.bit_rate = 0
            stream_options: dict[str, object] = dict(options)
            stream.options = stream_options
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB")).reformat(format=pix_fmt)  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)


@node("CreateVideo")
def create_video(ctx: NodeContext, images: ImageList, fps: float, audio: Any = None) -> NodeResult:
    return (Video(list(_require_images(images)), fps),), None


@node("GetVideoComponents")
def get_video_components(ctx: NodeContext, video: Video) -> NodeResult:
    return (video.frames, None, video.fps), None


@node("SaveVideo")
def save_video(ctx: NodeContext, video: Video, filename_prefix: str, format: str, codec: str) -> NodeResult:
    width, height = video.dimensions()
    folder, filename, counter, subfolder = save_path(ctx.paths, ctx.paths.output, filename_prefix, width, height)
    name = f"{filename}_{counter:05}_.mp4"
    _encode_video(folder / name, video.frames, video.fps, "h264", "yuv420p",
                  container_options={"movflags": "use_metadata_tags"})
    return (), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": [True]}


@node("SaveWEBM")
def save_webm(ctx: NodeContext, images: ImageList, codec: str, fps: float, filename_prefix: str = "ComfyUI",
              crf: float = 32.0) -> NodeResult:
    images = _require_images(images)
    folder, filename, counter, subfolder = save_path(ctx.paths, ctx.paths.output, filename_prefix, *images[0].size)
    name = f"{filename}_{counter:05}_.webm"
    lib = {"vp9": "libvpx-vp9", "av1": "libsvtav1"}[codec]
    options = {"crf": str(crf)}
    if codec == "av1":
        options["preset"] = "6"
    _encode_video(folder / name, images, fps, lib, "yuv420p10le" if codec == "av1" else "yuv420p", options)
    return (), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": [True]}


# ---------------------------------------------------------------------------------------------
# Model stand-ins: loaders, encoders, latents, samplers, VAE
# ---------------------------------------------------------------------------------------------


@node("CheckpointLoaderSimple")
def checkpoint_loader_simple(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    path = full_model_path(ctx.paths, "checkpoints", ckpt_name)
    if path is None:
        raise FileNotFoundError(f"Model in folder 'checkpoints' with filename '{ckpt_name}' not found.")
    try:
        _check_safetensors(path)
    except SafetensorError as e:
        raise _with_frames(e, _CHECKPOINT_FRAMES) from None
    return (Handle("MODEL", ckpt_name), Handle("CLIP", ckpt_name), Handle("VAE", ckpt_name)), None


@node("CheckpointLoader")
def checkpoint_loader(ctx: NodeContext, config_name: str, ckpt_name: str) -> NodeResult:
    _model_file(ctx, "checkpoints", ckpt_name)
    return (Handle("MODEL", ckpt_name), Handle("CLIP", ckpt_name), Handle("VAE", ckpt_name)), None


@node("ImageOnlyCheckpointLoader")
def image_only_checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    _model_file(ctx, "checkpoints", ckpt_name)
    return (Handle("MODEL", ckpt_name), Handle("CLIP_VISION", ckpt_name), Handle("VAE", ckpt_name)), None


@node("UNETLoader")
def unet_loader(ctx: NodeContext, unet_name: str, weight_dtype: str = "default") -> NodeResult:
    _model_file(ctx, "diffusion_models", unet_name)
    return (Handle("MODEL", unet_name),), None


@node("CLIPLoader")
def clip_loader(ctx: NodeContext, clip_name: str, type: str = "stable_diffusion", device: str = "default",
                ) -> NodeResult:
    _model_file(ctx, "text_encoders", clip_name)
    return (Handle("CLIP", clip_name, {"type": type}),), None


@node("DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader")
def multi_clip_loader(ctx: NodeContext, **inputs: Any) -> NodeResult:
    names = [v for k, v in sorted(inputs.items()) if k.startswith("clip_name")]
    for name in names:
        _model_file(ctx, "text_encoders", name)
    return (Handle("CLIP", "+".join(names)),), None


@node("CLIPVisionLoader")
def clip_vision_loader(ctx: NodeContext, clip_name: str) -> NodeResult:
    _model_file(ctx, "clip_vision", clip_name)
    return (Handle("CLIP_VISION", clip_name),), None


@node("VAELoader")
def vae_loader(ctx: NodeContext, vae_name: str) -> NodeResult:
    if vae_name in ("pixel_space", "taesd", "taesdxl", "taesd3", "taef1"):
        if vae_name not in vae_list(ctx.paths):
            raise FileNotFoundError(f"Model in folder 'vae_approx' with filename '{vae_name}' not found.")
        return (Handle("VAE", vae_name),), None
    _model_file(ctx, "vae", vae_name)
    return (Handle("VAE", vae_name),), None


@node("LoraLoaderModelOnly")
def lora_loader_model_only(ctx: NodeContext, model: Handle, lora_name: str, strength_model: float) -> NodeResult:
    _model_file(ctx, "loras", lora_name)
    return (model,), None


@node("LoraLoader")
def lora_loader(ctx: NodeContext, model: Handle, clip: Handle, lora_name: str, strength_model: float,
                strength_clip: float) -> NodeResult:
    _model_file(ctx, "loras", lora_name)
    return (model, clip), None


@node("ControlNetLoader")
def controlnet_loader(ctx: NodeContext, control_net_name: str) -> NodeResult:
    _model_file(ctx, "controlnet", control_net_name)
    return (Handle("CONTROL_NET", control_net_name),), None


def _clip_required(clip: Any) -> None:
    if clip is None:
        raise RuntimeError(
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint "
            "does not contain a valid clip or text encoder model."
        )


@node("CLIPTextEncode")
def clip_text_encode(ctx: NodeContext, text: str, clip: Handle) -> NodeResult:
    _clip_required(clip)
    return (Handle("CONDITIONING", text),), None


@node("TextEncodeQwenImageEditPlus")
def text_encode_qwen_image_edit_plus(ctx: NodeContext, clip: Handle, prompt: str, vae: Handle | None = None,
                                     image1: ImageList | None = None, image2: ImageList | None = None,
                                     image3: ImageList | None = None) -> NodeResult:
    _clip_required(clip)
    refs = sum(1 for im in (image1, image2, image3) if im)
    return (Handle("CONDITIONING", prompt, {"reference_images": refs}),), None


def _passthrough(ctx: NodeContext, **inputs: Any) -> NodeResult:
    """Nodes that only tweak a model or a conditioning: each output is the first input of its
    type (the model goes through), or a fresh handle."""
    class_inputs = ctx.schemas.static_input_types(ctx.class_type)
    typed = {}
    for name, value in inputs.items():
        kind, _, _ = get_input_info(class_inputs, name)
        if isinstance(kind, str) and kind not in typed and value is not None:
            typed[kind] = value
    kinds = ctx.schemas.return_types(ctx.class_type)
    outs = tuple(typed.get(kind) or Handle(str(kind), ctx.class_type) for kind in kinds)
    return outs, None


for _name in (
    "ModelSamplingSD3", "ModelSamplingAuraFlow", "ModelSamplingFlux", "ModelSamplingDiscrete", "CFGNorm",
    "FluxGuidance", "FluxKontextMultiReferenceLatentMethod", "ReferenceLatent", "ConditioningZeroOut",
    "ConditioningCombine", "ConditioningSetTimestepRange", "CLIPSetLastLayer", "CLIPVisionEncode", "KSamplerSelect",
    "CFGGuider", "BasicGuider", "DualCFGGuider", "SkipLayerGuidanceDiT", "PatchModelAddDownscale",
):
    NODE_IMPLS[_name] = _passthrough


def _latent(width: int, height: int, batch: int = 1, frames: int = 1, temporal: int = 1) -> Latent:
    return Latent(width=max(8, width // 8 * 8), height=max(8, height // 8 * 8), batch=batch, frames=frames,
                  temporal=temporal)


@node("EmptyLatentImage", "EmptySD3LatentImage")
def empty_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1) -> NodeResult:
    return (_latent(width, height, batch_size),), None


@node("EmptyHunyuanLatentVideo")
def empty_hunyuan_latent_video(ctx: NodeContext, width: int, height: int, length: int, batch_size: int = 1,
                               ) -> NodeResult:
    return (_latent(width, height, batch_size, (length - 1) // 4 + 1, 4),), None


@node("WanImageToVideo", "WanFirstLastFrameToVideo")
def wan_image_to_video(ctx: NodeContext, positive: Handle, negative: Handle, vae: Handle, width: int, height: int,
                       length: int, batch_size: int = 1, **_: Any) -> NodeResult:
    return (positive, negative, _latent(width, height, batch_size, (length - 1) // 4 + 1, 4)), None


@node("WanImageToVideoSVIPro")
def wan_image_to_video_generic(ctx: NodeContext, **inputs: Any) -> NodeResult:
    """A Wan image-to-video conditioning node (KJNodes' schema, recorded in object_info.json): the latent
    takes width/height/length from its inputs, or the size of its first image or latent input
    (WanImageToVideoSVIPro sizes its video by the anchor latent)."""
    images = [v for v in inputs.values() if isinstance(v, list) and v and isinstance(v[0], Image.Image)]
    sizes = [im[0].size for im in images] + [(v.width, v.height) for v in inputs.values() if isinstance(v, Latent)]
    width = int(inputs.get("width") or (sizes[0][0] if sizes else 832))
    height = int(inputs.get("height") or (sizes[0][1] if sizes else 480))
    length = int(inputs.get("length") or inputs.get("num_frames") or 81)
    latent = _latent(width, height, int(inputs.get("batch_size") or 1), (length - 1) // 4 + 1, 4)
    conditionings = [inputs.get("positive"), inputs.get("negative")]
    outs: list[Any] = []
    for kind in ctx.schemas.return_types(ctx.class_type):
        if kind == "LATENT":
            outs.append(latent)
        elif kind == "CONDITIONING":
            outs.append(conditionings.pop(0) if conditionings else Handle("CONDITIONING"))
        else:
            outs.append(Handle(str(kind)))
    return tuple(outs), None


@node("VAEEncode")
def vae_encode(ctx: NodeContext, pixels: ImageList, vae: Handle) -> NodeResult:
    w, h = pixels[0].size
    return (_latent(w, h, len(pixels)),), None


def _frame_color(seed: int, index: int) -> tuple[int, int, int]:
    rng = random.Random(f"{seed}:{index}")
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


@node("VAEDecode", "VAEDecodeTiled")
def vae_decode(ctx: NodeContext, samples: Latent, vae: Handle, **_: Any) -> NodeResult:
    seed = samples.seed or 0
    count = samples.batch * samples.decoded_frames()
    return ([Image.new("RGB", (samples.width, samples.height), _frame_color(seed, i)) for i in range(count)],), None


def _sample(ctx: NodeContext, latent: Latent, steps: int, seed: int | None) -> Latent:
    """Sampling without a model: one progress report (and preview) per step, with a short
    interruptible wait standing in for the model calls."""
    delay = float(ctx.config("step_delay_s"))
    preview_on = bool(ctx.config("preview"))
    preview_format = str(ctx.config("preview_format"))
    size = (max(8, latent.width // 8), max(8, latent.height // 8))
    for step in range(1, steps + 1):
        ctx.sleep(delay)
        preview: Preview | None = None
        if preview_on:
            preview = (preview_format, Image.new("RGB", size, _frame_color(seed or 0, step)), 512)
        ctx.progress(step, steps, preview)
    return Latent(latent.width, latent.height, latent.batch, latent.frames, latent.temporal,
                  seed if seed is not None else latent.seed)


@node("KSampler")
def ksampler(ctx: NodeContext, model: Handle, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive: Handle, negative: Handle, latent_image: Latent, denoise: float = 1.0) -> NodeResult:
    return (_sample(ctx, latent_image, steps, seed),), None


@node("KSamplerAdvanced")
def ksampler_advanced(ctx: NodeContext, model: Handle, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive: Handle, negative: Handle, latent_image: Latent,
                      start_at_step: int, end_at_step: int, return_with_leftover_noise: str) -> NodeResult:
    count = max(0, min(end_at_step, steps) - start_at_step)
    if count == 0:
        return (latent_image,), None
    seed = noise_seed if add_noise == "enable" else latent_image.seed
    return (_sample(ctx, latent_image, count, seed),), None


@node("BasicScheduler")
def basic_scheduler(ctx: NodeContext, model: Handle, scheduler: str, steps: int, denoise: float) -> NodeResult:
    return (Sigmas(steps if denoise > 0 else 0),), None


@node("SplitSigmas")
def split_sigmas(ctx: NodeContext, sigmas: Sigmas, step: int) -> NodeResult:
    high = min(step, sigmas.steps)
    return (Sigmas(high), Sigmas(sigmas.steps - high)), None


@node("RandomNoise")
def random_noise(ctx: NodeContext, noise_seed: int) -> NodeResult:
    return (Noise(noise_seed),), None


@node("DisableNoise")
def disable_noise(ctx: NodeContext) -> NodeResult:
    return (Noise(None),), None


@node("SamplerCustomAdvanced")
def sampler_custom_advanced(ctx: NodeContext, noise: Noise, guider: Handle, sampler: Handle, sigmas: Sigmas,
                            latent_image: Latent) -> NodeResult:
    out = _sample(ctx, latent_image, sigmas.steps, noise.seed)
    return (out, out), None


@node("SamplerCustom")
def sampler_custom(ctx: NodeContext, model: Handle, add_noise: bool, noise_seed: int, cfg: float, positive: Handle,
                   negative: Handle, sampler: Handle, sigmas: Sigmas, latent_image: Latent) -> NodeResult:
    out = _sample(ctx, latent_image, sigmas.steps, noise_seed if add_noise else latent_image.seed)
    return (out, out), None


