"""Chat requests: our fields and the official vLLM worker's, the vLLM call each becomes, and
how vLLM's answers (whole or as server-sent events) are shaped for the caller."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from diffbox.backends.vllm import StreamCut, sse_data
from diffbox.errors import JobError
from diffbox.workflows import CHAT_DROP_IN, NAMED, parse
from diffbox.workflows.chat import ChatRequest, Shaper, VllmWorkerRequest, call_for, presets

USER = [{"role": "user", "content": "a cat on a skateboard"}]
CHAT = {"workflow": "chat", "messages": USER}


def refusal(payload: dict[str, Any]) -> str:
    with pytest.raises(JobError) as caught:
        parse(payload)
    assert caught.value.type == "validation"
    return caught.value.message


def chat(**fields: Any) -> ChatRequest:
    workflow, request = parse({**CHAT, **fields})
    assert workflow is NAMED["chat"] and isinstance(request, ChatRequest)
    return request


def drop_in(payload: dict[str, Any]) -> VllmWorkerRequest:
    workflow, request = parse(payload)
    assert workflow is CHAT_DROP_IN and isinstance(request, VllmWorkerRequest)
    return request


@pytest.mark.parametrize(("payload", "message"), [
    ({**CHAT, "messages": []}, "messages: List should have at least 1 item"),
    ({**CHAT, "messages": "hello"}, "messages: Input should be a valid list"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
     "messages.0.role: Input should be 'system', 'user' or 'assistant'"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "tool": 1}]}, "messages.0.tool: unknown field"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
     "messages.0.content: part 0.type: Input should be 'text'"),
    ({"workflow": "chat"}, "prompt: required: give messages (OpenAI format) or prompt"),
    ({**CHAT, "prompt": "x"}, "prompt: give messages or prompt, not both"),
    ({**CHAT, "max_tokens": 4097}, "max_tokens: Input should be less than or equal to 4096"),
    ({**CHAT, "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({**CHAT, "temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
    ({**CHAT, "top_p": 0}, "top_p: Input should be greater than 0"),
    ({**CHAT, "stop": ["x"] * 17}, "stop: at most 16 strings of 1 to 200 characters"),
    ({**CHAT, "stop": ""}, "stop: at most 16 strings of 1 to 200 characters"),
    ({**CHAT, "preset": "poem"}, "preset: must be one of edit_prompt, i2v_prompt, got 'poem'"),
    ({**CHAT, "sampling_params": {}}, "sampling_params: unknown field"),
    ({"messages": USER, "sampling_params": {"best_of": 2}}, "sampling_params.best_of: unknown field"),
    ({"messages": USER, "sampling_params": {"max_tokens": 0}},
     "sampling_params.max_tokens: Input should be greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": 3}]},
     'messages.0.content: must be a string or a list of {"type": "text", "text"} parts'),
    ({"messages": USER, "prompt": "x"}, "prompt: give messages or prompt, not both"),
    ({"messages": USER, "max_tokens": 5}, "max_tokens: unknown field"),
    ({"openai_route": "/v1/embeddings"},
     "openai_route: must be one of /v1/chat/completions, /v1/completions, /v1/models, got '/v1/embeddings'"),
    ({"openai_route": "/v1/models", "prompt": "x"},
     "openai_route: give openai_route (with openai_input) or messages / prompt, not both"),
    ({"messages": USER, "openai_input": {}}, "openai_input: goes with openai_route"),
])
def test_bad_requests_are_refused_naming_the_field(payload: dict[str, Any], message: str) -> None:
    assert refusal(payload).startswith(message)


def test_defaults_follow_the_design() -> None:
    request = chat()
    assert (request.max_tokens, request.temperature, request.top_p, request.stop, request.seed, request.stream,
            request.preset) == (512, 0.7, 0.9, None, None, False, None)
    assert drop_in({"messages": USER}).sampling_params.max_tokens == 16  # vLLM's own, as in the official worker


def test_bare_worker_inputs_are_chat_in_the_official_workers_form() -> None:
    assert drop_in({"prompt": "Once upon"}).prompt == "Once upon"
    assert drop_in({"openai_route": "/v1/models"}).openai_route == "/v1/models"
    # Accepted for compatibility; each vLLM chunk is one chunk here.
    assert drop_in({"prompt": "x", "max_batch_size": 8, "stream": True}).stream


def test_our_request_becomes_a_chat_completion() -> None:
    call = call_for(chat(prompt=None, max_tokens=7, temperature=0, seed=3, stop=["\n"], stream=True), streamed=True)
    assert (call.method, call.route, call.stream, call.shape) == ("POST", "/v1/chat/completions", True, "diffbox")
    assert call.body == {"messages": USER, "max_tokens": 7, "temperature": 0, "top_p": 0.9, "stream": True,
                         "stop": ["\n"], "seed": 3, "stream_options": {"include_usage": True}}
    # Callers that take one result get the whole answer at once, whatever `stream` says.
    whole = call_for(chat(stream=True), streamed=False)
    assert whole.body is not None and not whole.stream and whole.body["stream"] is False
    assert "stream_options" not in whole.body


def test_prompt_is_one_user_message() -> None:
    call = call_for(parse({"workflow": "chat", "prompt": "hello"})[1], streamed=False)  # type: ignore[arg-type]
    assert call.body is not None and call.body["messages"] == [{"role": "user", "content": "hello"}]


def test_presets_put_their_system_prompt_first() -> None:
    assert set(presets()) == {"i2v_prompt", "edit_prompt"}
    i2v = presets()["i2v_prompt"].system
    assert all(word in i2v.lower() for word in ("subject", "motion", "camera", "lighting"))
    assert "imperative" in presets()["edit_prompt"].system
    messages = chat(preset="i2v_prompt").conversation()
    assert messages == [{"role": "system", "content": i2v}, *USER]
    # One system message, first: the caller's own is kept after the preset's.
    own = [{"role": "system", "content": "Be brief."}, *USER]
    merged = chat(messages=own, preset="i2v_prompt").conversation()
    assert merged == [{"role": "system", "content": f"{i2v}\n\nBe brief."}, *USER]
    parts = [{"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}, *USER]
    assert chat(messages=parts, preset="edit_prompt").conversation()[0]["content"].endswith("\n\nA\nB")


def test_worker_inputs_map_to_vllm_routes() -> None:
    sampling = {"max_tokens": 5, "temperature": 0, "top_k": 4, "stop": "x", "seed": 1}
    call = call_for(drop_in({"messages": USER, "sampling_params": sampling}), streamed=True)
    assert (call.route, call.shape, call.stream) == ("/v1/chat/completions", "vllm_worker", False)
    assert call.body == {**sampling, "stream": False, "messages": USER}
    # A bare prompt is continued as raw text; with apply_chat_template it is a user message.
    raw = call_for(drop_in({"prompt": "Once", "stream": True}), streamed=True)
    assert raw.route == "/v1/completions" and raw.body is not None and raw.body["prompt"] == "Once"
    assert raw.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    templated = call_for(drop_in({"prompt": "Once", "apply_chat_template": True}), streamed=True)
    assert templated.route == "/v1/chat/completions" and templated.body is not None
    assert templated.body["messages"] == [{"role": "user", "content": "Once"}]


def test_openai_input_passes_through() -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 3, "logit_bias": {"1": 2}, "stream": True}
    call = call_for(drop_in({"openai_route": "/v1/chat/completions", "openai_input": body}), streamed=True)
    assert (call.method, call.route, call.shape, call.stream, call.body) == (
        "POST", "/v1/chat/completions", "openai", True, body)
    assert call_for(drop_in({"openai_route": "/v1/chat/completions", "openai_input": body}), streamed=False).body == {
        **body, "stream": False}
    models = call_for(drop_in({"openai_route": "/v1/models"}), streamed=True)
    assert (models.method, models.body, models.needs_model) == ("GET", None, False)


CHAT_ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                            "finish_reason": "length"}],
               "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


def _events(*events: dict[str, Any]) -> list[str]:
    return [json.dumps(e) for e in events]


def _delta(text: str, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}]}


def test_whole_answers_in_each_shape() -> None:
    assert Shaper("diffbox").whole(CHAT_ANSWER) == {
        "text": "Hi there", "finish_reason": "length", "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    assert Shaper("vllm_worker").whole(CHAT_ANSWER) == {
        "choices": [{"tokens": ["Hi there"]}], "usage": {"input": 9, "output": 2}}
    completion = {"choices": [{"index": 0, "text": "upon", "finish_reason": "length"}], "usage": CHAT_ANSWER["usage"]}
    assert Shaper("vllm_worker").whole(completion)["choices"] == [{"tokens": ["upon"]}]
    assert Shaper("openai").whole(CHAT_ANSWER) is CHAT_ANSWER


def test_streamed_events_in_our_shape() -> None:
    shaper = Shaper("diffbox")
    events = _events({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                     _delta("Hi"), _delta(" there", finish="length"),
                     {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})
    chunks = [c for c in map(shaper.chunk, events) if c is not None]
    assert chunks == [{"delta": "Hi"}, {"delta": " there"}]
    assert shaper.end() == {"delta": "", "finish_reason": "length",
                            "usage": {"prompt_tokens": 9, "completion_tokens": 2}}


def test_streamed_events_in_the_official_workers_shape() -> None:
    shaper = Shaper("vllm_worker")
    usage = {"usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    chunks = [shaper.chunk(e) for e in _events({**_delta("a"), **usage}, _delta("b", index=1), _delta(""))]
    assert chunks == [{"choices": [{"tokens": ["a"]}], "usage": {"input": 3, "output": 1}},
                      {"choices": [{"tokens": []}, {"tokens": ["b"]}], "usage": {"input": 3, "output": 1}}, None]
    assert shaper.end() is None


def test_streamed_events_pass_through_as_text_for_openai_clients() -> None:
    shaper = Shaper("openai")
    assert shaper.chunk('{"a": 1}') == 'data: {"a": 1}\n\n'
    assert shaper.end() == "data: [DONE]\n\n"


def test_an_error_event_mid_stream_is_a_backend_error() -> None:
    with pytest.raises(JobError) as caught:
        Shaper("diffbox").chunk(json.dumps({"error": {"message": "engine dead", "code": 500}}))
    assert caught.value.type == "backend" and "engine dead" in caught.value.message


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _data(*parts: bytes) -> list[str]:
    return [d async for d in sse_data(_chunks(*parts))]


async def test_sse_keeps_a_character_split_between_two_reads_whole() -> None:
    body = 'data: {"t": "é→🙂"}\n\ndata: [DONE]\n\n'.encode()
    for cut in range(1, len(body)):  # every place a read can end, inside each character included
        assert await _data(body[:cut], body[cut:]) == ['{"t": "é→🙂"}'], cut


async def test_sse_framing() -> None:
    body = b"data: one\r\n\r\n: a comment\n\ndata:two\ndata: lines\n\nevent: x\ndata: [DONE]\n\ndata: late\n\n"
    assert await _data(body) == ["one", "two\nlines"]
    with pytest.raises(StreamCut):
        await _data(b"data: one\n\n")  # a server that dies mid-stream never sends [DONE]
