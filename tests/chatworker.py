"""The chat worker of the end-to-end tests: `python handler.py --rp_serve_api` with
DIFFBOX_BACKENDS=vllm, which starts a real vLLM (CPU build, tiny random-weight model from
tests/vllm_env/) itself from DIFFBOX_VLLM_COMMAND, as on RunPod. Starting vLLM takes about
35 s, so the suite has one (conftest.py's session fixture `chat_worker`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from tests.conftest import RunpodApi, free_port, start_runpod_api

CACHE = Path(os.environ.get("DIFFBOX_TEST_CACHE") or Path.home() / ".cache" / "diffbox-test")
PYTHON, MODEL = CACHE / "vllm-venv" / "bin" / "python", CACHE / "tiny-llama"
NOT_PREPARED = f"the test vLLM is not prepared in {CACHE}: run `bash tests/vllm_env/setup.sh` (make test does)"


def prepared() -> bool:
    return PYTHON.exists() and (MODEL / "config.json").exists()


@dataclass
class ChatWorker:
    api: RunpodApi
    vllm_url: str
    vllm_port: int

    def chunks(self, job_input: dict[str, Any]) -> list[Any]:
        """What /runsync returns for a generator handler: the list of its chunks."""
        body = self.api.runsync(job_input)
        assert body["status"] == "COMPLETED", body
        assert isinstance(body["output"], list)
        return body["output"]

    def result(self, job_input: dict[str, Any]) -> dict[str, Any]:
        [result] = self.chunks(job_input)
        assert "error" not in result, result
        return dict(result)

    def error(self, job_input: dict[str, Any]) -> dict[str, Any]:
        chunks = self.chunks(job_input)
        assert "error" in chunks[-1], chunks
        # The SDK reports an error chunk as a string; the handler makes it the error's JSON.
        return dict(json.loads(chunks[-1]["error"]))

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric of vLLM's /metrics over the series matching `labels`."""
        total = 0.0
        for line in requests.get(f"{self.vllm_url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def vllm_group(port: int) -> tuple[int | None, list[int]]:
    """The vLLM server listening on `port` (the leader) and every process of its group (which
    keeps the leader's id as its own when the leader is gone)."""
    leader = next((p.pid for p in psutil.process_iter(["cmdline"])
                   if {"vllm.entrypoints.openai.api_server", str(port)} <= set(p.info["cmdline"] or ())), None)
    if leader is None:
        return None, []
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == leader:
                members.append(process.pid)
    return leader, members


@contextlib.contextmanager
def start_chat_worker(tmp: Path) -> Iterator[ChatWorker]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFBOX_", "RUNPOD_", "BUCKET_"))}
    env.update(
        DIFFBOX_BACKENDS="vllm",
        DIFFBOX_VLLM_COMMAND=f"{PYTHON} -m vllm.entrypoints.openai.api_server",
        DIFFBOX_VLLM_MODEL=str(MODEL),
        DIFFBOX_VLLM_ARGS="--dtype bfloat16 --max-model-len 256 --enforce-eager",
        DIFFBOX_VLLM_PORT=str(port),
        DIFFBOX_STARTUP_TIMEOUT_S="300",
        DIFFBOX_WORK_DIR=str(tmp / "work"),
        DIFFBOX_LOG_LEVEL="INFO",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    api = start_runpod_api(env, tmp / "handler.log")
    api.timeout_s = 360
    worker = ChatWorker(api, f"http://127.0.0.1:{port}", port)
    try:
        # Waits for the worker's vLLM to be ready.
        worker.result({"workflow": "chat", "prompt": "Hi", "max_tokens": 1})
        yield worker
    finally:
        api.stop()
        # The worker stops vLLM when it exits; this only guards the machine should it not.
        leader, members = vllm_group(port)
        for pid in members:
            os.kill(pid, signal.SIGKILL)
        assert leader is None, f"vLLM outlived the worker:\n{api.logs()[-3000:]}"
