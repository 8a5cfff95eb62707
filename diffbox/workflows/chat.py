"""Chat on vLLM: the requests, the vLLM call each one becomes, and its answer in the caller's shape.

Three request forms, each answered in its own shape:

- `{"workflow": "chat", "messages" | "prompt", ...}`: ours. The result is
  `{"text", "finish_reason", "usage"}`; streamed, chunks `{"delta"}` and a last one that adds
  `finish_reason` and `usage`.
- The official RunPod vLLM worker's input without `workflow` (`messages` / `prompt` with
  `sampling_params`): its callers keep their code, so they get its output,
  `{"choices": [{"tokens": [...]}], "usage": {"input", "output"}}`.
- `openai_route` + `openai_input` (what RunPod's `/openai/v1` gateway sends): passed to that
  vLLM route as is; the answer is vLLM's own JSON, or streamed, its server-sent events as text.

Chat always goes through vLLM's `/v1/chat/completions`, so the model's own chat template
formats the conversation. Nothing here does I/O: `diffbox/chat.py` runs the call.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from ..errors import backend, clip, validation
from ..schemas import Strict, describe_validation_error
from .base import ImageLoader, JobContext, Plan
from .graph import WORKFLOWS_DIR

MAX_MESSAGES = 512
MAX_TEXT = 100_000  # characters of one message or prompt; the model's context is the real bound
MAX_TOKENS = 4096
# vLLM's own default (its SamplingParams), which the official worker's callers rely on.
WORKER_DEFAULT_MAX_TOKENS = 16
OPENAI_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET"}



@dataclass(frozen=True)
class Preset:
    description: str
    system: str


@functools.cache
def presets() -> dict[str, Preset]:
    data = json.loads((WORKFLOWS_DIR / "chat_presets.json").read_text())
    return {name: Preset(entry["description"], entry["system"]) for name, entry in data.items()}


def _check_stop(stop: Any) -> Any:
    # Before the union is tried: its errors would name pydantic's members ("stop.list[str]").
    items = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > 16 or any(not 1 <= len(s) <= 200 for s in items):
        raise ValueError("at most 16 strings of 1 to 200 characters")
    return stop


LongText = Annotated[str, Field(max_length=MAX_TEXT)]
Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop),
                 Field(description="Up to 16 strings; generation ends before any of them.")]


class TextPart(Strict):
    type: Literal["text"] = Field(description="Always \"text\".")
    text: LongText = Field(description="The text.")


class Message(Strict):
    """One OpenAI-format message; only text (the chat models served here read no images)."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: LongText | list[TextPart] = Field(description="The text, or a list of text parts.")
    name: str | None = Field(default=None, max_length=64, description="A name for the speaker, for the chat template.")

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, content: Any) -> Any:
        # Checked here so that an error names the part, not each branch of the union.
        if isinstance(content, list):
            try:
                _PARTS.validate_python(content)
            except ValidationError as exc:
                raise ValueError(f"part {describe_validation_error(exc)[0]}") from None
        elif not isinstance(content, str):
            raise ValueError("must be a string or a list of {\"type\": \"text\", \"text\"} parts")
        elif len(content) > MAX_TEXT:
            raise ValueError(f"String should have at most {MAX_TEXT} characters")
        return content


_PARTS = TypeAdapter(list[TextPart])


class ChatRequest(Strict):
    workflow: Literal["chat"] = Field(description="Selects this workflow.")
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES,
                                           description="The conversation, in OpenAI's format.")
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT, validate_default=True,
                               description="One user message; instead of messages.")
    max_tokens: int = Field(default=512, ge=1, le=MAX_TOKENS, description="At most this many (and what the context "
                            "leaves).")
    temperature: float = Field(default=0.7, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling: only the most likely tokens whose "
                         "probabilities add up to this.")
    stop: Stop = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Same seed, same text (temperature > 0).")
    stream: bool = Field(default=False, description="Stream the text as {\"delta\"} chunks.")
    preset: str | None = Field(default=None, description="A system prompt from workflows/chat_presets.json: "
                               "i2v_prompt or edit_prompt.")

    @field_validator("prompt")
    @classmethod
    def _one_source(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        if "messages" not in info.data:  # messages itself was refused; that error says enough
            return prompt
        if prompt is None and info.data["messages"] is None:
            raise ValueError("required: give messages (OpenAI format) or prompt")
        if prompt is not None and info.data["messages"] is not None:
            raise ValueError("give messages or prompt, not both")
        return prompt

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in presets():
            raise ValueError(f"must be one of {', '.join(sorted(presets()))}, got {clip(preset)}")
        return preset

    def conversation(self) -> list[dict[str, Any]]:
        """The messages for vLLM, the preset's system prompt first."""
        messages: list[dict[str, Any]] = (
            [m.model_dump(exclude_none=True) for m in self.messages] if self.messages is not None
            else [{"role": "user", "content": self.prompt}])
        if self.preset is None:
            return messages
        system = presets()[self.preset].system
        if messages[0]["role"] == "system":
            # Many templates (Mistral's among them) take one system message, and only first.
            own = messages[0]["content"]
            own_text = own if isinstance(own, str) else "\n".join(part["text"] for part in own)
            return [{"role": "system", "content": f"{system}\n\n{own_text}"}, *messages[1:]]
        return [{"role": "system", "content": system}, *messages]


class SamplingParams(Strict):
    """The official vLLM worker's `sampling_params` that vLLM's OpenAI server takes."""

    max_tokens: int = Field(default=WORKER_DEFAULT_MAX_TOKENS, ge=1,
                            description="At most this many tokens (the official vLLM worker's default).")
    temperature: float | None = Field(default=None, ge=0, description="Randomness of sampling; 0 is greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling: only the most likely "
                                "tokens whose probabilities add up to this.")
    top_k: int | None = Field(default=None, description="Only the k most likely tokens.")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Drops tokens less likely than this "
                                "fraction of the most likely one.")
    n: int | None = Field(default=None, ge=1, le=16, description="How many completions.")
    presence_penalty: float | None = Field(default=None, description="Penalises tokens that have appeared.")
    frequency_penalty: float | None = Field(default=None, description="Penalises tokens by how often they appeared.")
    repetition_penalty: float | None = Field(default=None, gt=0, description="Scales repeated tokens' "
                                             "likelihood down (1: no penalty).")
    length_penalty: float | None = Field(default=None, description="Beam search's penalty on length.")
    use_beam_search: bool | None = Field(default=None, description="Beam search instead of sampling.")
    stop: Stop = None
    stop_token_ids: list[int] | None = Field(default=None, description="Token ids that end the generation.")
    ignore_eos: bool | None = Field(default=None, description="Go on past the end-of-sequence token.")
    min_tokens: int | None = Field(default=None, ge=0, description="At least this many tokens before a stop counts.")
    seed: int | None = Field(default=None, description="Same seed, same text.")
    skip_special_tokens: bool | None = Field(default=None, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool | None = Field(default=None, description="Spaces between special "
                                                       "tokens in the text.")
    include_stop_str_in_output: bool | None = Field(default=None, description="Keep the stop string that "
                                                    "ended the text.")


class VllmWorkerRequest(Strict):
    """The official RunPod vLLM worker's input (no `workflow`), for its users to switch unchanged."""

    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES,
                                           description="The conversation, in OpenAI's format.")
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT,
                               description="A plain prompt, completed as it is (or see apply_chat_template).")
    sampling_params: SamplingParams = Field(default_factory=SamplingParams,
                                            description="vLLM's sampling settings, passed on as given.")
    stream: bool = Field(default=False, description="Stream the text in chunks.")
    apply_chat_template: bool = Field(default=False, description="Put prompt through the chat template.")
    # The official worker groups streamed tokens into batches; here each chunk vLLM streams is
    # one chunk, so these are taken for compatibility and have no effect.
    max_batch_size: int | None = Field(default=None, description="Taken for compatibility; no effect here.")
    min_batch_size: int | None = Field(default=None, description="Taken for compatibility; no effect here.")
    batch_size_growth_factor: float | None = Field(default=None, description="Taken for compatibility; no effect "
                                                   "here.")
    openai_route: str | None = Field(default=None, validate_default=True,
                                     description="An OpenAI route of vLLM: " + ", ".join(OPENAI_ROUTES))
    openai_input: dict[str, Any] | None = Field(default=None, validate_default=True,
                                                description="That route's request body, passed as is.")

    @field_validator("prompt")
    @classmethod
    def _not_both(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        if prompt is not None and info.data.get("messages") is not None:
            raise ValueError("give messages or prompt, not both")
        return prompt

    @field_validator("openai_route")
    @classmethod
    def _route(cls, route: str | None, info: ValidationInfo) -> str | None:
        if route is not None and route not in OPENAI_ROUTES:
            raise ValueError(f"must be one of {', '.join(OPENAI_ROUTES)}, got {clip(route)}")
        if "messages" not in info.data or "prompt" not in info.data:  # refused; that error says enough
            return route
        text = info.data["messages"] is not None or info.data["prompt"] is not None
        if route is not None and text:
            raise ValueError("give openai_route (with openai_input) or messages / prompt, not both")
        if route is None and not text:
            raise ValueError("required without messages or prompt")
        return route

    @field_validator("openai_input")
    @classmethod
    def _input_with_route(cls, body: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if body is not None and info.data.get("openai_route") is None and "openai_route" in info.data:
            raise ValueError("goes with openai_route")
        return body


Shape = Literal["diffbox", "vllm_worker", "openai"]


@dataclass(frozen=True)
class VllmCall:
    """One HTTP request to vLLM's OpenAI server and how its answer is shaped for the caller."""

    method: str
    route: str
    body: dict[str, Any] | None
    stream: bool
    shape: Shape
    # Added to the body unless the caller set it: vLLM refuses requests naming no model.
    needs_model: bool = True


def call_for(request: ChatRequest | VllmWorkerRequest, streamed: bool) -> VllmCall:
    """The vLLM request for `request`; `streamed` False asks for the whole answer at once
    (for callers that take one result, whatever the request's own `stream` says)."""
    if isinstance(request, ChatRequest):
        stream = streamed and request.stream
        body: dict[str, Any] = {"messages": request.conversation(), "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "top_p": request.top_p, "stream": stream}
        if request.stop is not None:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return VllmCall("POST", "/v1/chat/completions", body, stream, "diffbox")
    if request.openai_route is not None:
        method = OPENAI_ROUTES[request.openai_route]
        if method == "GET":
            return VllmCall("GET", request.openai_route, None, False, "openai", needs_model=False)
        body = dict(request.openai_input or {})
        stream = streamed and bool(body.get("stream"))
        body["stream"] = stream
        return VllmCall("POST", request.openai_route, body, stream, "openai")
    stream = streamed and request.stream
    body = {**request.sampling_params.model_dump(exclude_none=True), "stream": stream}
    if stream:
        # Usage on every chunk, as the official worker reports it with each batch.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if request.messages is not None:
        body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages]
    elif request.apply_chat_template:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        # A bare prompt is raw text to continue, no chat template: vLLM's completions route.
        body["prompt"] = request.prompt
        return VllmCall("POST", "/v1/completions", body, stream, "vllm_worker")
    return VllmCall("POST", "/v1/chat/completions", body, stream, "vllm_worker")


def _text(choice: dict[str, Any]) -> str:
    """A choice's text: chat answers carry `message` (`delta` when streamed), completions `text`."""
    if "text" in choice:
        return str(choice["text"] or "")
    part = choice.get("message") or choice.get("delta") or {}
    return str(part.get("content") or "")


def _usage(body: dict[str, Any]) -> dict[str, int]:
    usage = body.get("usage") or {}
    return {"prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "completion_tokens": int(usage.get("completion_tokens", 0))}


def _event(data: str) -> dict[str, Any]:
    event = json.loads(data)
    if not isinstance(event, dict):
        raise backend("vLLM streamed something that is not a JSON object")
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise backend(f"vLLM failed while generating: {message}", {"vllm_error": error})
    return event


class Shaper:
    """Turns vLLM's answer into the caller's result (whole) or chunks (streamed)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}

    def whole(self, body: Any) -> Any:
        if self.shape == "openai":
            return body
        choices = body.get("choices") or []
        usage = _usage(body)
        if self.shape == "vllm_worker":
            return {"choices": [{"tokens": [_text(c)]} for c in choices],
                    "usage": {"input": usage["prompt_tokens"], "output": usage["completion_tokens"]}}
        if not choices:
            raise backend("vLLM answered with no choices", {"vllm_response": body})
        return {"text": _text(choices[0]), "finish_reason": choices[0].get("finish_reason"), "usage": usage}

    def chunk(self, data: str) -> Any:
        """The chunk for one streamed event (its `data:` text), or None when it adds no text."""
        if self.shape == "openai":
            return f"data: {data}\n\n"
        event = _event(data)
        if event.get("usage"):
            self.usage = _usage(event)
        choices = event.get("choices") or []
        if self.shape == "vllm_worker":
            tokens = {int(c.get("index", 0)): _text(c) for c in choices}
            if not any(tokens.values()):
                return None
            width = max(tokens) + 1
            return {"choices": [{"tokens": [tokens[i]] if tokens.get(i) else []} for i in range(width)],
                    "usage": {"input": self.usage["prompt_tokens"], "output": self.usage["completion_tokens"]}}
        delta = "".join(_text(c) for c in choices)
        for choice in choices:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return {"delta": delta} if delta else None

    def end(self) -> Any:
        """The last chunk, after vLLM's `[DONE]`."""
        if self.shape == "openai":
            return "data: [DONE]\n\n"
        if self.shape == "vllm_worker":
            return None
        return {"delta": "", "finish_reason": self.finish_reason, "usage": self.usage}


def plan(request: Any, ctx: JobContext, load_image: ImageLoader) -> Plan:
    raise validation("workflow: chat runs on vLLM; it has no ComfyUI graph")
