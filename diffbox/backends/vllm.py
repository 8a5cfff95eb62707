"""vLLM's OpenAI-compatible server as this worker runs it: a supervised subprocess (the same
`Supervisor` as ComfyUI's) or an attached URL, and the streaming it speaks.

vLLM lives in an environment of its own (`DIFFBOX_VLLM_COMMAND` names its Python), started on
loopback at cold start beside ComfyUI. Its `/health` answers before the model can serve (a
broken model dies on its first request), so readiness is a real one-token completion.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import aiohttp
import requests

from .. import logs
from ..config import Settings
from .process import ServerProcess, Supervisor

log = logs.get("vllm")
HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 30.0


def argv(settings: Settings) -> list[str]:
    """The command that starts vLLM's OpenAI server for these settings."""
    if settings.vllm_model is None:
        raise ValueError("set DIFFBOX_VLLM_MODEL (a model for the worker to start vLLM with) or DIFFBOX_VLLM_URL")
    args = [*settings.vllm_command, "--model", settings.vllm_model, "--host", HOST, "--port", str(settings.vllm_port),
            "--gpu-memory-utilization", str(settings.vllm_gpu_memory_utilization)]
    if settings.vllm_revision:
        args += ["--revision", settings.vllm_revision]
    if settings.vllm_max_model_len:
        args += ["--max-model-len", str(settings.vllm_max_model_len)]
    # Last, so that a flag given here wins over the same flag built from a setting above.
    return args + settings.vllm_args


def env() -> dict[str, str]:
    """What vLLM's environment needs beyond the worker's own."""
    extra = {"PYTHONUNBUFFERED": "1"}  # so the log tail is complete when it dies
    if "VLLM_HOST_IP" not in os.environ:
        # Otherwise its engine's internal message queue binds the machine's own address.
        extra["VLLM_HOST_IP"] = HOST
    return extra


class VllmServer:
    def __init__(self, settings: Settings) -> None:
        process = None
        if settings.vllm_url:
            self.url = settings.vllm_url.rstrip("/")
        else:
            self.url = f"http://{HOST}:{settings.vllm_port}"
            process = ServerProcess("vllm", argv(settings), env=env())
        # The id vLLM serves the model under (its path or HF id, or --served-model-name),
        # learned by the probe: requests must name it.
        self.model: str | None = None
        self.supervisor = Supervisor("vllm", self.probe, process)

    def probe(self) -> bool:
        try:
            models = requests.get(f"{self.url}/v1/models", timeout=5)
            if models.status_code != 200:
                return False
            model = str(models.json()["data"][0]["id"])
            answer = requests.post(f"{self.url}/v1/completions", timeout=PROBE_TIMEOUT_S,
                                   json={"model": model, "prompt": "Hi", "max_tokens": 1})
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
            return False
        if answer.status_code != 200:
            logs.event(log, "vLLM answered the readiness request with an error", level=30,
                       status=answer.status_code)
            return False
        self.model = model
        return True


class StreamCut(aiohttp.ClientPayloadError):
    """The event stream ended without vLLM's closing `[DONE]`."""


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event, until `[DONE]`.

    Bytes arrive cut anywhere, a multibyte character included: an incremental decoder keeps
    the first half of such a character until the rest comes.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    data: list[str] = []
    async for raw in chunks:
        pending += decoder.decode(raw)
        *lines, pending = pending.split("\n")
        for line in lines:
            line = line.removesuffix("\r")
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
            elif not line and data:  # a blank line ends an event
                event, data = "\n".join(data), []
                if event == "[DONE]":
                    return
                yield event
    raise StreamCut("vLLM's event stream ended before [DONE]")


async def error_of(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    """vLLM's message for a refused request, and its error object (or the raw text)."""
    text = await response.text(errors="replace")
    try:
        error: Any = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text[:500] or response.reason or str(response.status), text[:2000]
    message = error.get("message") if isinstance(error, dict) else error
    return str(message), error
