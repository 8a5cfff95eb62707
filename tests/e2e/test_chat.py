"""Chat against a real vLLM (CPU build, tiny random-weight model: tests/vllm_env/).

The session's chat worker (tests/chatworker.py): `python handler.py --rp_serve_api` with
DIFFBOX_BACKENDS=vllm, which starts vLLM itself from DIFFBOX_VLLM_COMMAND, as on RunPod.
Chunk-level checks use a `Service` in this process attached to that same vLLM by URL. Random
weights write gibberish (U+FFFD, control characters): texts are compared with each other,
never with readable expectations. The test that kills vLLM runs last in this module: the
next job pays for a second start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from diffbox.config import Settings
from diffbox.service import Service
from diffbox.workflows.chat import presets
from tests.chatworker import MODEL, ChatWorker, vllm_group
from tests.conftest import TEST_INPUT, ComfyTarget

# Two vLLM starts (the second after the kill) on a busy 2-core machine take minutes.
pytestmark = pytest.mark.timeout(400)

MESSAGES = [{"role": "user", "content": "Describe the picture."}]
GREEDY = {"temperature": 0, "seed": 7}
PLAIN = {"workflow": "chat", "messages": MESSAGES, "max_tokens": 24, **GREEDY}
LONG_TOKENS = 240  # about all the 256-token context leaves; about a second of generation
LONG = {"workflow": "chat", "prompt": "Tell a long story.", "max_tokens": LONG_TOKENS, **GREEDY}
# 256 sequences at once (OpenAI's `n`): seconds of generation, time enough to act in the middle.
HEAVY_N = 256
HEAVY = {"prompt": "Tell", "max_tokens": LONG_TOKENS, "n": HEAVY_N, "ignore_eos": True, "temperature": 1}


@pytest.fixture(scope="module")
def attached(chat_worker: ChatWorker) -> Service:
    return Service(Settings(backends=["vllm"], vllm_url=chat_worker.vllm_url, startup_timeout_s=60))


async def _collect(service: Service, job_id: str, payload: dict[str, Any],
                   stop: threading.Event | None = None) -> list[Any]:
    return [chunk async for chunk in service.stream(job_id, payload, stop=stop)]


def test_plain_chat(chat_worker: ChatWorker) -> None:
    result = chat_worker.result(PLAIN)
    assert set(result) == {"text", "finish_reason", "usage"}
    assert isinstance(result["text"], str) and result["text"]
    # The tiny model never emits EOS: max_tokens ends every answer.
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 24 and result["usage"]["prompt_tokens"] > 0
    assert chat_worker.result({**PLAIN, "max_tokens": 5})["usage"]["completion_tokens"] == 5
    assert chat_worker.result(PLAIN) == result  # greedy: the same text every time


async def test_streamed_chunks_join_to_the_plain_text(chat_worker: ChatWorker, attached: Service) -> None:
    plain = chat_worker.result(PLAIN)
    streamed = {**PLAIN, "stream": True}
    for chunks in (chat_worker.chunks(streamed), await _collect(attached, "s", streamed)):
        *deltas, last = chunks
        assert len(deltas) > 5 and all(set(c) == {"delta"} and c["delta"] for c in deltas)
        assert "".join(c["delta"] for c in chunks) == plain["text"]
        assert last == {"delta": "", "finish_reason": "length", "usage": plain["usage"]}
    # A caller taking one result (Modal's run, the HTTP API) gets the plain result.
    assert await attached.run("r", {**PLAIN, "stream": True}) == plain


def test_stop_strings_end_the_text(chat_worker: ChatWorker) -> None:
    text = chat_worker.result(PLAIN)["text"]
    middle = len(text) // 2
    stop = text[middle:middle + 3]
    result = chat_worker.result({**PLAIN, "stop": [stop]})
    assert result["finish_reason"] == "stop"
    assert result["text"] == text[:text.index(stop)]
    streamed = chat_worker.chunks({**PLAIN, "stop": stop, "stream": True})
    assert "".join(c["delta"] for c in streamed) == result["text"] and streamed[-1]["finish_reason"] == "stop"


def test_presets_reach_the_model(chat_worker: ChatWorker) -> None:
    assert chat_worker.result({**PLAIN, "max_tokens": 1})["usage"]["prompt_tokens"] < 50
    for preset in ("i2v_prompt", "edit_prompt"):
        # What vLLM's chat template makes of the preset's system prompt and the user's message:
        # more than the tiny model's 256-token context (its tokenizer is wasteful), so vLLM
        # refuses the request, and the refusal is the proof that the preset reached it.
        conversation = [{"role": "system", "content": presets()[preset].system}, *MESSAGES]
        tokens = requests.post(f"{chat_worker.vllm_url}/tokenize", timeout=10,
                               json={"model": str(MODEL), "messages": conversation}).json()["count"]
        assert tokens > 256
        error = chat_worker.error({**PLAIN, "max_tokens": 1, "preset": preset})
        assert error["type"] == "validation" and error["message"].startswith("input_tokens: "), error


def test_official_vllm_worker_inputs(chat_worker: ChatWorker) -> None:
    ours = chat_worker.result({**PLAIN, "max_tokens": 6})
    sampling = {"max_tokens": 6, **GREEDY}
    [answer] = chat_worker.chunks({"messages": MESSAGES, "sampling_params": sampling})
    assert answer == {"choices": [{"tokens": [ours["text"]]}],
                      "usage": {"input": ours["usage"]["prompt_tokens"], "output": 6}}
    streamed = chat_worker.chunks({"messages": MESSAGES, "sampling_params": sampling, "stream": True})
    assert "".join(t for c in streamed for t in c["choices"][0]["tokens"]) == ours["text"]
    assert streamed[-1]["usage"] == {"input": ours["usage"]["prompt_tokens"], "output": 6}
    # A bare prompt is continued as text (no chat template): fewer prompt tokens than as a message.
    [continued] = chat_worker.chunks({"prompt": "Describe the picture.", "sampling_params": sampling})
    assert continued["usage"]["output"] == 6 and continued["usage"]["input"] < ours["usage"]["prompt_tokens"]
    [default] = chat_worker.chunks({"messages": MESSAGES})
    assert default["usage"]["output"] == 16  # vLLM's default max_tokens, as in the official worker


def test_openai_routes_pass_through(chat_worker: ChatWorker) -> None:
    [models] = chat_worker.chunks({"openai_route": "/v1/models"})
    model = models["data"][0]["id"]
    assert models["object"] == "list" and model == str(MODEL)
    ours = chat_worker.result(PLAIN)
    body = {"model": model, "messages": MESSAGES, "max_tokens": 24, **GREEDY}
    [completion] = chat_worker.chunks({"openai_route": "/v1/chat/completions", "openai_input": body})
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == ours["text"]
    events = chat_worker.chunks({"openai_route": "/v1/chat/completions", "openai_input": {**body, "stream": True}})
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events) and events[-1] == "data: [DONE]\n\n"
    deltas = [json.loads(e[6:])["choices"] for e in events[:-1]]
    assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c) == ours["text"]
    [text] = chat_worker.chunks({"openai_route": "/v1/completions", "openai_input": {"prompt": "Hi", "max_tokens": 3}})
    assert text["object"] == "text_completion"  # the model is filled in when the caller leaves it out


async def test_bad_messages_are_refused_before_vllm_is_called(chat_worker: ChatWorker) -> None:
    before = chat_worker.metric("vllm:request_success_total")
    error = chat_worker.error({"workflow": "chat", "messages": [*MESSAGES, {"role": "wizard", "content": "x"}]})
    assert error["type"] == "validation"
    assert error["message"] == "messages.1.role: Input should be 'system', 'user' or 'assistant'"
    assert chat_worker.error({"messages": [{"role": "user"}]})["message"] == "messages.0.content: Field required"
    assert chat_worker.metric("vllm:request_success_total") == before
    # Refused before even waiting for vLLM: a worker whose vLLM never answers refuses without
    # connecting to it (the listener below never accepts; a connection would wait in its backlog).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        silent = Service(Settings(backends=["vllm"], vllm_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                                  startup_timeout_s=1))
        refused = await silent.run("bad", {"workflow": "chat", "messages": [{"role": "wizard", "content": "x"}]})
        assert refused["error"]["type"] == "validation"
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (await silent.run("good", PLAIN))["error"]["type"] == "timeout"  # nothing listens there now
    # vLLM's own refusals name the field too.
    error = chat_worker.error({**PLAIN, "max_tokens": 300})  # more than --max-model-len 256
    assert error["type"] == "validation" and error["message"].startswith("max_tokens: ")


def _has_begun(worker: ChatWorker, prompted: float) -> bool:
    """vLLM runs a request, or has read a prompt since `prompted` (vllm:prompt_tokens_total):
    its API server, busy streaming, may answer /metrics only after a quick request is done."""
    return (worker.metric("vllm:num_requests_running") >= 1
            or worker.metric("vllm:prompt_tokens_total") > prompted)


def _stop_once_running(worker: ChatWorker, stop: threading.Event) -> None:
    prompted = worker.metric("vllm:prompt_tokens_total")
    while not _has_begun(worker, prompted):
        time.sleep(0.01)
    stop.set()


async def _generated_since(worker: ChatWorker, before: float) -> float:
    """Tokens vLLM generated since `before`, once it runs no request."""
    for _ in range(100):
        if worker.metric("vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.1)
    return worker.metric("vllm:generation_tokens_total") - before


async def test_cancelling_a_stream_stops_generation(chat_worker: ChatWorker, attached: Service) -> None:
    plain = chat_worker.result(PLAIN)
    # The platform cancels the job's task (RunPod's cancel, a timeout).
    tokens = chat_worker.metric("vllm:generation_tokens_total")
    got: list[Any] = []
    three = asyncio.Event()

    async def consume() -> None:
        async for chunk in attached.stream("cancel", {**LONG, "stream": True}):
            got.append(chunk)
            if len(got) == 3:
                three.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(three.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The closed request ends the generation (vLLM counts no abort for a client that leaves).
    assert await _generated_since(chat_worker, tokens) < LONG_TOKENS, "vLLM went on generating"
    assert len(got) < 100
    # A platform that cannot cancel the task sets `stop` (Modal's inputs): the job ends cancelled.
    tokens = chat_worker.metric("vllm:generation_tokens_total")
    stop = threading.Event()
    chunks: list[Any] = []
    async for chunk in attached.stream("stop", {**LONG, "stream": True}, stop=stop):
        chunks.append(chunk)
        if len(chunks) == 3:
            stop.set()
    assert chunks[-1]["error"]["type"] == "cancelled" and len(chunks) < 100
    assert await _generated_since(chat_worker, tokens) < LONG_TOKENS
    # The same for a caller waiting for the whole answer (vLLM sends nothing before its end).
    tokens = chat_worker.metric("vllm:generation_tokens_total")
    stop = threading.Event()
    threading.Thread(target=_stop_once_running, args=(chat_worker, stop), daemon=True).start()
    whole = await attached.run("stop-whole", {"openai_route": "/v1/completions", "openai_input": HEAVY}, stop=stop)
    assert whole["error"]["type"] == "cancelled"
    assert await _generated_since(chat_worker, tokens) < HEAVY_N * LONG_TOKENS
    # vLLM serves the next request as before.
    assert chat_worker.result(PLAIN) == plain


async def test_concurrent_chats_are_served_together(attached: Service) -> None:
    stamps: dict[int, list[float]] = {}

    async def one(k: int) -> list[Any]:
        chunks = []
        async for chunk in attached.stream(f"c{k}", {**LONG, "max_tokens": 120, "seed": k, "stream": True}):
            stamps.setdefault(k, []).append(time.monotonic())
            chunks.append(chunk)
        return chunks

    answers = await asyncio.gather(*(one(k) for k in range(3)))
    assert all(a[-1]["usage"]["completion_tokens"] == 120 for a in answers)
    # Each job's first chunk came before any job's last: vLLM batched them.
    assert max(s[0] for s in stamps.values()) < min(s[-1] for s in stamps.values())


@pytest.mark.fake_leg_only("it checks the generator endpoint's chunks, not ComfyUI; a second vLLM start for the "
                           "real leg would cost a minute of the suite's budget")
async def test_a_comfyui_job_on_a_generator_endpoint_is_one_chunk(comfyui: ComfyTarget, chat_worker: ChatWorker,
                                                                  tmp_path: Path) -> None:
    both = Service(Settings(backends=["comfyui", "vllm"], comfyui_url=comfyui.url, comfyui_dir=comfyui.base_dir,
                            vllm_url=chat_worker.vllm_url, work_dir=tmp_path, startup_timeout_s=60))
    [result] = await _collect(both, "graph", TEST_INPUT["input"])
    assert "error" not in result and len(result["images"]) == 2
    [chat] = await _collect(both, "chat", PLAIN)
    assert chat == chat_worker.result(PLAIN)
    only_chat = Service(Settings(backends=["vllm"], vllm_url=chat_worker.vllm_url))
    [refused] = await _collect(only_chat, "graph", TEST_INPUT["input"])
    assert refused["error"]["type"] == "validation"


def test_vllm_killed_mid_request_fails_the_job_and_the_next_starts_a_fresh_one(chat_worker: ChatWorker) -> None:
    """Last in this module: the next job pays for a second vLLM start."""
    leader, members = vllm_group(chat_worker.vllm_port)
    assert leader is not None and len(members) > 1  # the server and its engine
    answer: dict[str, Any] = {}
    prompted = chat_worker.metric("vllm:prompt_tokens_total")
    # Four times the heavy request: it must still be generating when the kill arrives (once, the
    # heavy request alone was done before a look at /metrics saw it).
    job = threading.Thread(target=lambda: answer.update(chunks=chat_worker.chunks(
        {"openai_route": "/v1/completions", "openai_input": {**HEAVY, "n": 4 * HEAVY_N}})))
    job.start()
    while not _has_begun(chat_worker, prompted):
        assert job.is_alive(), f"the job ended before vLLM was seen running it: {str(answer)[:500]}"
        time.sleep(0.01)
    os.kill(leader, signal.SIGKILL)  # the API server only: its engine processes live on
    job.join(120)
    [chunk] = answer["chunks"]
    error = json.loads(chunk["error"])
    assert error["type"] == "backend"
    assert error["message"] == "vllm exited with code -9 during the job"
    assert error["details"]["exit_code"] == -9 and error["details"]["log_tail"]
    # The next job starts a fresh vLLM, after the old one's engine processes are gone.
    assert chat_worker.result({**PLAIN, "max_tokens": 3})["usage"]["completion_tokens"] == 3
    new_leader, _ = vllm_group(chat_worker.vllm_port)
    assert new_leader not in (None, leader)
    assert not [pid for pid in members if Path(f"/proc/{pid}").exists()], "the old engine outlived the restart"
