"""The workflows this worker serves, and how a request finds its own.

A request's `workflow` is a name (a typed workflow) or an API-format graph (raw). Each
workflow module owns its request model and turns a request into a `Plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import clip, validation
from ..schemas import describe_validation_error
from . import chat, i2v, manifest, qwen_edit, raw, svi, wan
from .base import ImageLoader, JobContext, Plan


@dataclass(frozen=True)
class Workflow:
    name: str
    request: type[BaseModel]
    plan: Callable[[Any, JobContext, ImageLoader], Plan]
    # The request's model set in workflows/models.json and its preset ("i2v", "fast").
    models: Callable[[Any], tuple[str, str]] | None = None


RAW = Workflow("raw", raw.RawRequest, raw.plan)
# Named workflows; the typed ones register here as they are added.
NAMED: dict[str, Workflow] = {
    "i2v": Workflow("i2v", i2v.I2VRequest, i2v.plan, wan.models),
    "svi": Workflow("svi", svi.SviRequest, svi.plan, wan.models),
    "qwen_edit": Workflow("qwen_edit", qwen_edit.QwenEditRequest, qwen_edit.plan, qwen_edit.models),
    "chat": Workflow("chat", chat.ChatRequest, chat.plan),
}
# Chat as the official RunPod vLLM worker takes it: its input without `workflow`.
CHAT_DROP_IN = Workflow("chat", chat.VllmWorkerRequest, chat.plan)


def check_models(workflow: Workflow, request: Any, models_dir: Path) -> None:
    """Refuse, before anything is queued, a request whose weights are not on this worker
    or differ from its weights lock."""
    if workflow.models is not None:
        manifest.check_on_disk(*workflow.models(request), models_dir)


def workflow_name(payload: dict[str, Any]) -> str:
    """Which workflow a request asks for, before it is validated."""
    selector = payload.get("workflow")
    if isinstance(selector, dict):
        return "raw"
    if isinstance(selector, str):
        return selector
    if selector is None and any(k in payload for k in ("messages", "prompt", "openai_route")):
        return "chat"  # the official RunPod vLLM worker's inputs, for drop-in use
    raise validation(
        "workflow: required; a workflow name ("
        + ", ".join(sorted(NAMED) or ["none configured"])
        + ") or a ComfyUI API-format graph object"
    )


def parse(payload: Any) -> tuple[Workflow, BaseModel]:
    """Validate a job's input against its workflow's request model."""
    if not isinstance(payload, dict):
        raise validation(f"input: expected a JSON object, got {type(payload).__name__}")
    name = workflow_name(payload)
    workflow = RAW if name == "raw" else NAMED.get(name)
    if name == "chat" and "workflow" not in payload:
        workflow = CHAT_DROP_IN
    if workflow is None:
        raise validation(f"workflow: unknown workflow {clip(name)}; known: {', '.join(sorted(NAMED)) or 'none'}")
    try:
        return workflow, workflow.request.model_validate(payload)
    except ValidationError as exc:
        message, details = describe_validation_error(exc)
        raise validation(message, details) from None
