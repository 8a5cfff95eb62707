"""The request and result contract at the edges (DESIGN.md sections 2 and 3).

Requests are discriminated by `workflow`: a name for the typed workflows, or the
API-format graph object itself for raw graphs (the official RunPod ComfyUI worker's input).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import key_name


class Strict(BaseModel):
    """Unknown fields are refused: they are usually typos a caller wants to hear about."""

    model_config = ConfigDict(extra="forbid")


class OutputOptions(Strict):
    store: Literal["s3", "inline"] | None = Field(
        default=None, description="Where outputs go; default S3 when configured, else inline."
    )
    prefix: str | None = Field(
        default=None,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$",
        description="Key prefix in the bucket; keys are {prefix}/{job_id}/{file name}.",
    )
    include_temp: bool = Field(default=False, description="Also return ComfyUI's temp previews.")


class Output(BaseModel):
    """One output file, as the result contract describes it."""

    kind: Literal["image", "video", "audio", "file"]
    filename: str
    content_type: str
    bytes: int
    sha256: str
    node: str | None = None
    url: str | None = None
    s3_uri: str | None = None
    data: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    clip: int | None = None


class Progress(BaseModel):
    """One progress update (DESIGN.md section 4); callers keep the highest `seq`."""

    seq: int
    stage: Literal["starting", "inputs", "downloading", "queued", "running", "uploading", "cancelled", "timeout"]
    percent: float
    node: str | None = None
    step: int | None = None
    steps: int | None = None
    clip: int | None = None
    clips: int | None = None
    # downloading: bytes of the current file so far, and its size when known.
    bytes: int | None = None
    total: int | None = None
    elapsed_s: float
    eta_s: float | None = None


MAX_DETAILS = 20


def describe_validation_error(exc: ValidationError, root: str = "") -> tuple[str, list[dict[str, Any]]]:
    """A one-line message naming each bad field, and the per-field details."""
    details = []
    errors = exc.errors()
    # Every unknown key is an error: a payload with a million of them must not echo them all.
    for err in errors[:MAX_DETAILS]:
        loc = ".".join(str(part) for part in ((root,) if root else ()) + tuple(err["loc"]))
        loc = key_name(loc)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        details.append({"field": loc or "input", "message": message})
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    if len(errors) > 5:
        summary += f"; and {len(errors) - 5} more"
    return summary, details
