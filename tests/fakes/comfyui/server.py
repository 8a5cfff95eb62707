"""The fake ComfyUI's process: ComfyUI 0.3.64's server.py and main.py as a client sees them.

HTTP routes (also under /api), the WebSocket with its message queue, the prompt queue and
history (execution.PromptQueue), the execution thread (main.prompt_worker) and the fault
injection hooks. Handlers mirror ComfyUI's code on purpose: a malformed request fails the same way
(an uncaught exception becomes aiohttp's plain-text 500, as in ComfyUI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import heapq
import ipaddress
import json
import logging
import mimetypes
import os
import shutil
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from io import BytesIO
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from .faults import Fault, FaultBook, FaultPoint, parse_fault
from .nodes import PromptExecutor
from .validate import MODEL_FOLDERS, Paths, Schemas, annotated_filepath, filename_list, validate_prompt

COMFYUI_VERSION = "0.3.64"
MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
GARBAGE_BODY = b"<html>\x00\xff\xfe fake ComfyUI fault: garbage_http, this is not JSON"
DIE_EXIT_CODE = 3

# GET /extensions as recorded (the frontend's core extensions).
EXTENSIONS = [
    "/extensions/core/groupNode.js",
    "/extensions/core/maskEditorOld.js",
    "/extensions/core/clipspace.js",
    "/extensions/core/maskEditorLayerFilenames.js",
    "/extensions/core/widgetInputs.js",
    "/extensions/core/groupNodeManage.js",
    "/extensions/core/load3d/NodeStorage.js",
    "/extensions/core/load3d/ViewHelperManager.js",
    "/extensions/core/load3d/ControlsManager.js",
    "/extensions/core/load3d/RecordingManager.js",
    "/extensions/core/load3d/ModelExporter.js",
    "/extensions/core/load3d/AnimationManager.js",
    "/extensions/core/load3d/LoaderManager.js",
    "/extensions/core/load3d/LightingManager.js",
    "/extensions/core/load3d/CameraManager.js",
    "/extensions/core/load3d/SceneModelManager.js",
    "/extensions/core/load3d/SceneManager.js",
    "/extensions/core/load3d/PreviewManager.js",
    "/extensions/core/load3d/EventManager.js",
]

log = logging.getLogger("fake_comfyui")


@dataclass
class FakeConfig:
    """Knobs of the fake (POST /__fake__/config)."""

    step_delay_s: float = 0.01  # sleep per sampler step / upscale tile (interruptible)
    node_delay_s: float = 0.0  # extra work per executed node (not interruptible, like a real node)
    preview: bool = True  # sampler previews (binary frames); --preview-method none turns them off
    preview_format: str = "JPEG"  # samplers' previews are JPEG in ComfyUI; "PNG" also allowed
    disable_metadata: bool = False  # no prompt/workflow text chunks in saved PNGs

    def update(self, values: Any) -> None:
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object")
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; known: {sorted(known)}")
            current = getattr(self, key)
            if isinstance(current, bool):
                ok = isinstance(value, bool)
            elif isinstance(current, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            else:
                ok = value in ("JPEG", "PNG")
            if not ok:
                raise ValueError(f"bad value for {key}: {value!r}")
        for key, value in values.items():
            setattr(self, key, float(value) if isinstance(getattr(self, key), float) else value)


class PromptQueue:
    """execution.PromptQueue: a heap ordered by number, what runs now, and the history."""

    def __init__(self, server: FakeComfyUI) -> None:
        self.server = server
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[tuple[Any, ...]] = []
        self.currently_running: dict[int, tuple[Any, ...]] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}

    def put(self, item: tuple[Any, ...]) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.server.queue_updated()
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[tuple[Any, ...], int] | None:
        with self.not_empty:
            while len(self.queue) == 0:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and len(self.queue) == 0:
                    return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.server.queue_updated()
            return item, i

    def task_done(self, item_id: int, history_result: dict[str, Any], status: dict[str, Any],
                  process_item: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None) -> None:
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            if process_item is not None:
                prompt = process_item(prompt)
            self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": copy.deepcopy(status)}
            self.history[prompt[1]].update(history_result)
            self.server.queue_updated()

    def get_current_queue_volatile(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        with self.mutex:
            return list(self.currently_running.values()), copy.copy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []
            self.server.queue_updated()

    def delete_queue_item(self, function: Callable[[tuple[Any, ...]], bool]) -> bool:
        with self.mutex:
            for x in range(len(self.queue)):
                if function(self.queue[x]):
                    if len(self.queue) == 1:
                        self.wipe_queue()
                    else:
                        self.queue.pop(x)
                        heapq.heapify(self.queue)
                    self.server.queue_updated()
                    return True
        return False

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1,
                    ) -> dict[str, Any]:
        with self.mutex:
            if prompt_id is None:
                out = {}
                if offset < 0 and max_items is not None:
                    offset = len(self.history) - max_items
                for i, k in enumerate(self.history):
                    if i >= offset:
                        out[k] = self.history[k]
                        if max_items is not None and len(out) >= max_items:
                            break
                return copy.deepcopy(out)
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}

    def wipe_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history_item(self, id_to_delete: str) -> None:
        with self.mutex:
            self.history.pop(id_to_delete, None)

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self) -> dict[str, Any]:
        with self.mutex:
            flags, self.flags = self.flags, {}
            return flags


def _has_prompt_id(prompt_id: Any, item: tuple[Any, ...]) -> bool:
    return bool(item[1] == prompt_id)


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for _, _, _, _, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return loopback
                loopback = True
        except socket.gaierror:
            pass
    return loopback


@web.middleware
async def origin_only_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                                 ) -> web.StreamResponse:
    """ComfyUI refuses (403) a request to a loopback host from another origin (a web page's POST)."""
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain = request.headers["Host"].lower()
        origin_domain = urllib.parse.urlparse(request.headers["Origin"]).netloc.lower()
        host_parsed = urllib.parse.urlsplit("//" + host_domain)
        if is_loopback(host_parsed.hostname) and host_domain != origin_domain:
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _memory() -> tuple[int, int]:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages // 2


class FakeComfyUI:
    def __init__(self, args: argparse.Namespace, paths: Paths) -> None:
        self.args = args
        self.paths = paths
        self.config = FakeConfig(step_delay_s=args.fake_step_delay, preview=args.preview_method != "none",
                                 disable_metadata=args.disable_metadata)
        self.schemas = Schemas(paths)
        self.prompt_queue = PromptQueue(self)
        self.executor = PromptExecutor(self, self.schemas, paths)
        self.faults = FaultBook()
        self.interrupt = threading.Event()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self._connections: dict[web.WebSocketResponse, tuple[web.Request, asyncio.Event]] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.number = 0
        self.max_upload_size = round(args.max_upload_size * 1024 * 1024)
        self.argv = ["main.py", *sys.argv[1:]]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.messages: asyncio.Queue[tuple[Any, ...]] | None = None
        self.runner: web.AppRunner | None = None
        self.site: web.SockSite | None = None
        self.host = "127.0.0.1"
        self.port = 0
        # Fault states: HTTP hang, garbage answers, listener closed.
        self._hanging = False
        self._unhang: asyncio.Event | None = None
        self._worker_unhang = threading.Event()
        self._worker_unhang.set()
        self._garbage = False
        self._background: set[asyncio.Future[Any]] = set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        # asyncio keeps only weak references to tasks: hold them until they finish.
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- messages (PromptServer.send_sync and the publishing loop) -------------------------------

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        assert self.loop is not None and self.messages is not None
        self.loop.call_soon_threadsafe(self.messages.put_nowait, item)

    def send(self, event: str, data: Any, sid: str | None) -> None:
        self._enqueue(("json", event, data, sid))

    def send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._enqueue(("bytes", payload, sid))

    def queue_updated(self) -> None:
        self.send("status", {"status": self.get_queue_info()}, None)

    def get_queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.prompt_queue.get_tasks_remaining()}}

    async def _safe_send(self, ws: web.WebSocketResponse, send: Callable[[], Awaitable[None]]) -> None:
        try:
            await send()
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
            log.warning("send error: %s", err)

    async def _send_json(self, event: str, data: Any, sid: str | None) -> None:
        message = {"type": event, "data": data}
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            await self._safe_send(ws, functools.partial(ws.send_json, message))

    async def _send_bytes(self, payload: bytes, sid: str | None) -> None:
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            await self._safe_send(ws, functools.partial(ws.send_bytes, payload))

    async def publish_loop(self) -> None:
        assert self.messages is not None
        while True:
            item = await self.messages.get()
            try:
                if item[0] == "json":
                    await self._send_json(item[1], item[2], item[3])
                elif item[0] == "bytes":
                    await self._send_bytes(item[1], item[2])
                else:
                    _, action, notify = item
                    try:
                        await action()
                    finally:
                        if notify is not None:
                            notify()
            except Exception:
                traceback.print_exc()

    def _run_in_order(self, action: Callable[[], Awaitable[None]], wait: bool) -> None:
        """Run `action` on the loop after every message queued before it (from the worker thread)."""
        done = threading.Event()
        self._enqueue(("call", action, done.set))
        if wait:
            done.wait()

    async def _run_in_order_async(self, action: Callable[[], Awaitable[None]]) -> None:
        assert self.loop is not None and self.messages is not None
        future: asyncio.Future[None] = self.loop.create_future()

        def notify() -> None:
            if not future.done():
                future.set_result(None)

        self.messages.put_nowait(("call", action, notify))
        await future

    # -- Host protocol for the executor ---------------------------------------------------------

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid is None or sid not in self.sockets_metadata:
            return False
        return self.sockets_metadata[sid].get("feature_flags", {}).get("supports_preview_metadata", False) is True

    def set_last_node(self, node_id: str | None) -> None:
        self.last_node_id = node_id

    def config_value(self, name: str) -> Any:
        return getattr(self.config, name)

    def fault_point(self, point: FaultPoint) -> None:
        """Called on the execution thread; may not return (die) or block (hang)."""
        for fault in self.faults.take(point):
            print(f"fake ComfyUI: fault {fault.kind} fires at {point}", flush=True)
            if fault.kind == "die":
                self._run_in_order(self._die, wait=True)
                threading.Event().wait()
            elif fault.kind == "drop_ws":
                self._run_in_order(functools.partial(self._drop_sockets, bool(fault.when.get("graceful"))), wait=True)
            elif fault.kind == "hang":
                self._run_in_order(functools.partial(self._start_state, "hang", fault.duration_s), wait=True)
                self._worker_unhang.wait()
            else:
                self._run_in_order(functools.partial(self._start_state, fault.kind, fault.duration_s), wait=True)

    # -- fault effects (on the loop) ------------------------------------------------------------

    async def _die(self) -> None:
        print(f"fake ComfyUI: injected fault 'die', exiting with code {DIE_EXIT_CODE}", flush=True)
        sys.stderr.flush()
        os._exit(DIE_EXIT_CODE)

    async def _drop_sockets(self, graceful: bool) -> None:
        connections = list(self._connections.items())
        closing = []
        for ws, (request, _) in connections:
            if graceful:
                closing.append(self._spawn(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                                    message=b"fake fault: drop_ws")))
            elif request.transport is not None:
                request.transport.abort()
        # Wait for the handlers' cleanup, so a quick reconnect is not unregistered by the old one.
        for _, (_, done) in connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 2.0)
        for task in closing:
            task.cancel()

    async def _start_state(self, kind: str, duration_s: float | None) -> None:
        assert self.loop is not None
        if kind == "hang":
            self._set_hang(True)
            if duration_s:
                self.loop.call_later(duration_s, self._set_hang, False)
        elif kind == "garbage_http":
            self._garbage = True
            if duration_s:
                self.loop.call_later(duration_s, setattr, self, "_garbage", False)
        elif kind == "refuse":
            await self.stop_listening()
            if duration_s:
                self.loop.call_later(duration_s, lambda: self._spawn(self.start_listening()))

    def _set_hang(self, on: bool) -> None:
        assert self._unhang is not None
        self._hanging = on
        if on:
            self._unhang.clear()
            self._worker_unhang.clear()
        else:
            self._unhang.set()
            self._worker_unhang.set()

    async def _fire_in_request(self, fault: Fault) -> web.StreamResponse | None:
        """A fault hit while handling a request (the 'post' stage); may answer the request itself."""
        print(f"fake ComfyUI: fault {fault.kind} fires at POST /prompt", flush=True)
        if fault.kind == "die":
            await self._run_in_order_async(self._die)
        elif fault.kind == "drop_ws":
            await self._run_in_order_async(lambda: self._drop_sockets(bool(fault.when.get("graceful"))))
        else:
            await self._start_state(fault.kind, fault.duration_s)
            if fault.kind == "hang" and self._unhang is not None:
                await self._unhang.wait()
            if self._garbage:
                return web.Response(status=200, body=GARBAGE_BODY, content_type="text/html")
        return None

    @web.middleware
    async def fault_middleware(self, request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path.startswith("/__fake__/"):
            return await handler(request)
        if self._hanging and self._unhang is not None:
            await self._unhang.wait()
        if self._garbage:
            return web.Response(status=200, body=GARBAGE_BODY, content_type="text/html")
        return await handler(request)

    # -- listening -----------------------------------------------------------------------------

    async def start_listening(self) -> None:
        if self.site is not None:
            return
        assert self.runner is not None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()

    async def stop_listening(self) -> None:
        if self.site is not None:
            site, self.site = self.site, None
            await site.stop()

    # -- the execution thread (main.prompt_worker) ---------------------------------------------

    def prompt_worker(self) -> None:
        executor = self.executor
        while True:
            queue_item = self.prompt_queue.get(timeout=1000.0)
            if queue_item is not None:
                item, item_id = queue_item
                started = time.perf_counter()
                prompt_id = item[1]
                self.last_prompt_id = prompt_id
                extra_data = dict(item[3])
                extra_data.update(item[5])
                try:
                    executor.execute(item[2], prompt_id, extra_data, item[4])
                except Exception:
                    # A bug in the fake must not wedge the queue: record the run as failed.
                    traceback.print_exc()
                    executor.success = False
                self.prompt_queue.task_done(
                    item_id, executor.history_result,
                    {"status_str": "success" if executor.success else "error", "completed": executor.success,
                     "messages": executor.status_messages},
                    process_item=lambda p: p[:5] + p[6:],
                )
                if self.client_id is not None:
                    self.send("executing", {"node": None, "prompt_id": prompt_id}, self.client_id)
                print(f"Prompt executed in {time.perf_counter() - started:.2f} seconds", flush=True)
            flags = self.prompt_queue.get_flags()
            if flags.get("free_memory", False):
                executor.reset()

    # -- routes ----------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_upload_size,
                              middlewares=[self.fault_middleware, origin_only_middleware])
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/", self.get_root),
            ("GET", "/ws", self.websocket_handler),
            ("GET", "/embeddings", self.get_embeddings),
            ("GET", "/models", self.list_model_types),
            ("GET", "/models/{folder}", self.get_models),
            ("GET", "/extensions", self.get_extensions),
            ("POST", "/upload/image", self.upload_image),
            ("GET", "/view", self.view_image),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.get_features),
            ("GET", "/settings", self.get_settings),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info_node),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_prompt_id),
            ("GET", "/queue", self.get_queue),
            ("POST", "/prompt", self.post_prompt),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("POST", "/history", self.post_history),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, "/api" + path, handler)
            app.router.add_route(method, path, handler)
        app.router.add_route("GET", "/__fake__/config", self.fake_get_config)
        app.router.add_route("POST", "/__fake__/config", self.fake_post_config)
        app.router.add_route("GET", "/__fake__/fault", self.fake_get_faults)
        app.router.add_route("POST", "/__fake__/fault", self.fake_post_fault)
        app.router.add_route("DELETE", "/__fake__/fault", self.fake_delete_faults)
        return app

    async def get_root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=f"<!doctype html><title>ComfyUI</title><p>fake ComfyUI {COMFYUI_VERSION}</p>",
                            content_type="text/html")

    async def websocket_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            # Reusing an existing session: the old socket stays open but gets nothing any more.
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        done = asyncio.Event()
        self._connections[ws] = (request, done)
        try:
            await self._send_json("status", {"status": self.get_queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self._send_json("executing", {"node": self.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    log.warning("ws connection closed with exception %s", ws.exception())
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                        if first_message and data.get("type") == "feature_flags":
                            self.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
                            await self._send_json("feature_flags", self.server_features(), sid)
                        first_message = False
                    except json.JSONDecodeError:
                        log.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                    except Exception as e:
                        log.error("Error processing WebSocket message: %s", e)
        finally:
            # As ComfyUI: the finally of an old socket of a reused clientId drops the new one too.
            self.sockets.pop(sid, None)
            self.sockets_metadata.pop(sid, None)
            self._connections.pop(ws, None)
            done.set()
        return ws

    def server_features(self) -> dict[str, Any]:
        return {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size}

    async def get_embeddings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([os.path.splitext(x)[0] for x in filename_list(self.paths, "embeddings")])

    async def list_model_types(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(list(MODEL_FOLDERS))

    async def get_models(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info.get("folder", None)
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(filename_list(self.paths, folder))

    async def get_extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(EXTENSIONS)

    def _dir_by_type(self, dir_type: str | None) -> tuple[str, str]:
        if dir_type is None:
            dir_type = "input"
        directory = self.paths.directory_by_type(dir_type)
        if directory is None:
            # ComfyUI's get_dir_by_type leaves its local unset for other types.
            raise UnboundLocalError("cannot access local variable 'type_dir' where it is not associated with a value")
        return str(directory), dir_type

    async def upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image: Any = post.get("image")
        overwrite = post.get("overwrite")
        image_is_duplicate = False
        upload_dir, image_upload_type = self._dir_by_type(post.get("type"))  # type: ignore[arg-type]
        if image and image.file:
            filename = image.filename
            if not filename:
                return web.Response(status=400)
            subfolder = post.get("subfolder", "")
            full_output_folder = os.path.join(upload_dir, os.path.normpath(str(subfolder)))
            filepath = os.path.abspath(os.path.join(full_output_folder, filename))
            if os.path.commonpath((upload_dir, filepath)) != upload_dir:
                return web.Response(status=400)
            if not os.path.exists(full_output_folder):
                os.makedirs(full_output_folder)
            split = os.path.splitext(filename)
            if not (overwrite is not None and (overwrite == "true" or overwrite == "1")):
                i = 1
                while os.path.exists(filepath):
                    if self._same_bytes(filepath, image):
                        image_is_duplicate = True
                        break
                    filename = f"{split[0]} ({i}){split[1]}"
                    filepath = os.path.join(full_output_folder, filename)
                    i += 1
            if not image_is_duplicate:
                with open(filepath, "wb") as f:
                    f.write(image.file.read())
            return web.json_response({"name": filename, "subfolder": subfolder, "type": image_upload_type})
        return web.Response(status=400)

    @staticmethod
    def _same_bytes(filepath: str, image: Any) -> bool:
        with open(filepath, "rb") as f:
            same = bool(f.read() == image.file.read())
        image.file.seek(0)
        return same

    async def view_image(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" in query:
            filename, kind = annotated_filepath(query["filename"])
            output_dir = str(self.paths.directory_by_type(kind)) if kind else None
            if not filename:
                return web.Response(status=400)
            if filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            if output_dir is None:
                directory = self.paths.directory_by_type(query.get("type", "output"))
                output_dir = str(directory) if directory is not None else None
            if output_dir is None:
                return web.Response(status=400)
            if "subfolder" in query:
                full_output_dir = os.path.join(output_dir, query["subfolder"])
                if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
                    return web.Response(status=403)
                output_dir = full_output_dir
            filename = os.path.basename(filename)
            file = os.path.join(output_dir, filename)
            if os.path.isfile(file):
                disposition = {"Content-Disposition": f'filename="{filename}"'}
                if "preview" in query:
                    with Image.open(file) as img:
                        preview_info = query["preview"].split(";")
                        image_format = preview_info[0]
                        if image_format not in ["webp", "jpeg"] or "a" in query.get("channel", ""):
                            image_format = "webp"
                        quality = int(preview_info[-1]) if preview_info[-1].isdigit() else 90
                        buffer = BytesIO()
                        out = img.convert("RGB") if image_format == "jpeg" or query.get("channel", "") == "rgb" else img
                        out.save(buffer, format=image_format, quality=quality)
                        return web.Response(body=buffer.getvalue(), content_type=f"image/{image_format}",
                                            headers=disposition)
                channel = query.get("channel", "rgba")
                if channel == "rgb":
                    with Image.open(file) as img:
                        rgb = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
                        buffer = BytesIO()
                        rgb.save(buffer, format="PNG")
                        return web.Response(body=buffer.getvalue(), content_type="image/png", headers=disposition)
                if channel == "a":
                    with Image.open(file) as img:
                        alpha = img.split()[3] if img.mode == "RGBA" else Image.new("L", img.size, 255)
                        alpha_img = Image.new("RGBA", alpha.size)
                        alpha_img.putalpha(alpha)
                        buffer = BytesIO()
                        alpha_img.save(buffer, format="PNG")
                        return web.Response(body=buffer.getvalue(), content_type="image/png", headers=disposition)
                content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                                    "text/css"}:
                    content_type = "application/octet-stream"
                return web.FileResponse(file, headers={**disposition, "Content-Type": content_type})
        return web.Response(status=404)

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        ram_total, ram_free = _memory()
        if self.args.cpu:
            device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                      "torch_vram_total": ram_total, "torch_vram_free": ram_free}
        else:
            vram = 24 * 1024**3
            device = {"name": "cuda:0 Fake GPU : cudaMallocAsync", "type": "cuda", "index": 0, "vram_total": vram,
                      "vram_free": vram - 512 * 1024**2, "torch_vram_total": 0, "torch_vram_free": 0}
        return web.json_response({
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "2.14.1+cu130",
                "embedded_python": False,
                "argv": self.argv,
            },
            "devices": [device],
        })

    async def get_features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.server_features())

    async def get_settings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({})

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.get_queue_info())

    async def get_object_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.schemas.all_info())

    async def get_object_info_node(self, request: web.Request) -> web.StreamResponse:
        node_class = request.match_info.get("node_class")
        out = {}
        if node_class is not None and node_class in self.schemas:
            out[node_class] = self.schemas.info(node_class)
        return web.json_response(out)

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        max_items = request.rel_url.query.get("max_items", None)
        offset = request.rel_url.query.get("offset", None)
        return web.json_response(self.prompt_queue.get_history(
            max_items=int(max_items) if max_items is not None else None,
            offset=int(offset) if offset is not None else -1,
        ))

    async def get_history_prompt_id(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.prompt_queue.get_history(prompt_id=request.match_info.get("prompt_id")))

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        running, queued = self.prompt_queue.get_current_queue_volatile()
        return web.json_response({
            "queue_running": [list(i[:5]) for i in running],
            "queue_pending": [list(i[:5]) for i in queued],
        })

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        print("got prompt", flush=True)
        json_data = await request.json()
        for fault in self.faults.take(FaultPoint("post")):
            answer = await self._fire_in_request(fault)
            if answer is not None:
                return answer

        if "number" in json_data:
            number: float | int = float(json_data["number"])
        else:
            number = self.number
            if json_data.get("front"):
                number = -number
            self.number += 1

        if "prompt" in json_data:
            prompt = json_data["prompt"]
            prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
            partial = json_data.get("partial_execution_targets")
            valid = validate_prompt(self.schemas, prompt, partial)
            extra_data: dict[str, Any] = {}
            if "extra_data" in json_data:
                extra_data = json_data["extra_data"]
            if "client_id" in json_data:
                extra_data["client_id"] = json_data["client_id"]
            if valid[0]:
                sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
                self.prompt_queue.put((number, prompt_id, prompt, extra_data, valid[2], sensitive))
                return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid[3]})
            print(f"invalid prompt: {valid[1]}", flush=True)
            return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)
        error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                 "extra_info": {}}
        return web.json_response({"error": error, "node_errors": {}}, status=400)

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if json_data.get("clear"):
            self.prompt_queue.wipe_queue()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.prompt_queue.delete_queue_item(functools.partial(_has_prompt_id, id_to_delete))
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        if prompt_id:
            running, _ = self.prompt_queue.get_current_queue_volatile()
            # A targeted interrupt only stops that prompt if it is the one running.
            if any(item[1] == prompt_id for item in running):
                self.interrupt.set()
        else:
            self.interrupt.set()
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        unload_models = json_data.get("unload_models", False)
        free_memory = json_data.get("free_memory", False)
        if unload_models:
            self.prompt_queue.set_flag("unload_models", unload_models)
        if free_memory:
            self.prompt_queue.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if json_data.get("clear"):
            self.prompt_queue.wipe_history()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.prompt_queue.delete_history_item(id_to_delete)
        return web.Response(status=200)

    # -- control routes ------------------------------------------------------------------------

    async def fake_get_config(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(asdict(self.config))

    async def fake_post_config(self, request: web.Request) -> web.StreamResponse:
        try:
            self.config.update(await request.json())
        except (ValueError, json.JSONDecodeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(asdict(self.config))

    def _active_states(self) -> list[str]:
        return [name for name, on in (("hang", self._hanging), ("garbage_http", self._garbage),
                                      ("refuse", self.site is None)) if on]

    async def fake_get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"armed": self.faults.armed(), "active": self._active_states()})

    async def fake_delete_faults(self, request: web.Request) -> web.StreamResponse:
        await self._clear_faults()
        return web.json_response({"armed": []})

    async def _clear_faults(self) -> None:
        self.faults.clear()
        self._set_hang(False)
        self._garbage = False
        await self.start_listening()

    async def fake_post_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if isinstance(body, dict) and body.get("kind") == "clear":
                await self._clear_faults()
                return web.json_response({"armed": []})
            fault = parse_fault(body)
        except (ValueError, json.JSONDecodeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        self.faults.arm(fault)
        if fault.stage == "now":
            self.faults.take(FaultPoint("now"))
            assert self.loop is not None
            # Answer first, then act, so the caller learns the fault is armed.
            if fault.kind == "die":
                self.loop.call_later(0.05, lambda: self._enqueue(("call", self._die, None)))
            elif fault.kind == "drop_ws":
                graceful = bool(fault.when.get("graceful"))
                self.loop.call_later(0.01, lambda: self._spawn(self._drop_sockets(graceful)))
            elif fault.kind == "refuse":
                duration = fault.duration_s
                self.loop.call_later(0.05, lambda: self._spawn(self._start_state("refuse", duration)))
            else:
                await self._start_state(fault.kind, fault.duration_s)
        return web.json_response({"armed": fault.as_dict()})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py", description="fake ComfyUI (tests only)")
    parser.add_argument("--listen", type=str, default="127.0.0.1", nargs="?", const="0.0.0.0,::")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--base-directory", type=str, default=None)
    parser.add_argument("--input-directory", type=str, default=None)
    parser.add_argument("--output-directory", type=str, default=None)
    parser.add_argument("--temp-directory", type=str, default=None)
    parser.add_argument("--preview-method", type=str, default="auto")
    parser.add_argument("--max-upload-size", type=float, default=100)
    parser.add_argument("--disable-metadata", action="store_true")
    parser.add_argument("--fake-step-delay", type=float, default=0.01, help="seconds per sampler step")
    parser.add_argument("--fake-startup-delay", type=float, default=0.0, help="seconds before listening")
    # Any other ComfyUI flag (--highvram, --use-sage-attention...) is accepted and ignored.
    args, _unknown = parser.parse_known_args(argv)
    return args


def _listen_host(listen: str) -> str:
    first = listen.split(",")[0].strip() or "127.0.0.1"
    if is_loopback(first):
        return first
    print(f"fake ComfyUI: not listening on {first}, loopback only: 127.0.0.1", flush=True)
    return "127.0.0.1"


async def serve(server: FakeComfyUI, host: str, port: int) -> None:
    server.loop = asyncio.get_running_loop()
    server.messages = asyncio.Queue()
    server._unhang = asyncio.Event()
    server._unhang.set()
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None)
    await runner.setup()
    server.runner = runner
    server.host, server.port = host, port
    await server.start_listening()
    shown = f"[{host}]" if ":" in host else host
    print("Starting server\n", flush=True)
    print(f"To see the GUI go to: http://{shown}:{server.port}", flush=True)
    threading.Thread(target=server.prompt_worker, name="prompt_worker", daemon=True).start()
    publisher = server._spawn(server.publish_loop())
    try:
        await asyncio.Event().wait()
    finally:
        publisher.cancel()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    paths = Paths.create(args.base_directory or os.getcwd(), args.input_directory, args.output_directory,
                         args.temp_directory)
    paths.ensure()
    # main.cleanup_temp: ComfyUI empties its temp folder at start-up.
    shutil.rmtree(paths.temp, ignore_errors=True)
    paths.temp.mkdir(parents=True, exist_ok=True)
    print(f"fake ComfyUI {COMFYUI_VERSION} (test double), base directory {paths.base}", flush=True)
    print("Device: cpu" if args.cpu else "Device: cuda:0 Fake GPU : cudaMallocAsync", flush=True)
    if args.fake_startup_delay > 0:
        time.sleep(args.fake_startup_delay)
    server = FakeComfyUI(args, paths)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(server, _listen_host(args.listen), args.port))
    return 0
