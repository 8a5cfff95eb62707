"""The RunPod job API as the SDK's production loop talks to it, on loopback.

What RunPod runs is `runpod.serverless.start` taking jobs from `RUNPOD_WEBHOOK_GET_JOB`,
posting progress and results to `RUNPOD_WEBHOOK_POST_OUTPUT` and long-polling the job-stop
channel derived from the job-take URL. This server answers those routes, so the real worker
loop (progress posts, cancellation by task cancel, concurrency) runs offline.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Post:
    job_id: str
    body: dict[str, Any]


@dataclass
class FakeRunpodApi:
    port: int = 0
    jobs: deque[dict[str, Any]] = field(default_factory=deque)
    posts: list[Post] = field(default_factory=list)
    stops: set[str] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self, pod_id: str = "test-pod") -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}"
        return {
            "RUNPOD_POD_ID": pod_id,
            "RUNPOD_AI_API_KEY": "test-key",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$RUNPOD_POD_ID?gpu=none",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=none",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=none",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=none",
            "RUNPOD_PING_INTERVAL": "1000",
        }

    def add_job(self, job_id: str, job_input: dict[str, Any]) -> None:
        with self._lock:
            self.jobs.append({"id": job_id, "input": job_input})

    def stop_job(self, job_id: str) -> None:
        with self._lock:
            self.stops.add(job_id)

    def posts_for(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p.body for p in self.posts if p.job_id == job_id]

    def final(self, job_id: str) -> dict[str, Any] | None:
        done = [b for b in self.posts_for(job_id) if b.get("status") != "IN_PROGRESS"]
        return done[-1] if done else None

    async def _take(self, request: web.Request) -> web.Response:
        with self._lock:
            jobs = [self.jobs.popleft()] if self.jobs else []
        if not jobs:
            await asyncio.sleep(0.2)  # as RunPod's long poll, without holding the test up
            return web.Response(status=204)
        if "/job-take-batch/" in request.path:
            return web.json_response(jobs)
        return web.json_response(jobs[0])

    async def _stop(self, request: web.Request) -> web.Response:
        for _ in range(5):
            with self._lock:
                ids, self.stops = list(self.stops), set()
            if ids:
                return web.json_response({"jobsToStop": ids})
            await asyncio.sleep(0.1)
        return web.Response(status=204)

    async def _done(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        with self._lock:
            self.posts.append(Post(request.match_info["job_id"], body))
        return web.Response(text="ok")

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def start(self) -> FakeRunpodApi:
        ready = threading.Event()
        app = web.Application()
        app.router.add_get("/job-take/{pod}", self._take)
        app.router.add_get("/job-take-batch/{pod}", self._take)
        app.router.add_get("/job-stop/{pod}", self._stop)
        app.router.add_post("/job-done/{pod}/{job_id}", self._done)
        app.router.add_post("/job-stream/{pod}/{job_id}", self._done)
        app.router.add_get("/ping/{pod}", self._ping)

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()

        threading.Thread(target=serve, name="fake-runpod-api", daemon=True).start()
        assert ready.wait(10)
        return self

    def close(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
