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

    kind: Literal["image", "video", "audio", "file"] = Field(description="What the file holds, by its type.")
    filename: str = Field(description="The file's name as ComfyUI saved it.")
    content_type: str = Field(description="Its media type (image/png, video/mp4, ...).")
    bytes: int = Field(description="Its size.")
    sha256: str = Field(description="Of its bytes; the client checks it after a download.")
    node: str | None = Field(default=None, description="The node that saved it.")
    url: str | None = Field(default=None, description="In S3: a presigned GET.")
    s3_uri: str | None = Field(default=None, description="In S3: s3://bucket/key.")
    data: str | None = Field(default=None, description="Inline: the file in base64; in S3: the presigned URL.")
    width: int | None = Field(default=None, description="Images and videos: pixels.")
    height: int | None = Field(default=None, description="Images and videos: pixels.")
    frames: int | None = Field(default=None, description="Videos: frames.")
    fps: float | None = Field(default=None, description="Videos: frames per second.")
    duration_s: float | None = Field(default=None, description="Videos: seconds.")
    clip: int | None = Field(default=None, description="svi: the clip the file belongs to.")


class Progress(BaseModel):
    """One progress update (DESIGN.md section 4); callers keep the highest `seq`."""

    seq: int = Field(description="Rises with each update; updates can arrive out of order: keep the highest.")
    stage: Literal["starting", "inputs", "downloading", "queued", "running", "uploading", "cancelled",
                   "timeout"] = Field(description="Where the job is.")
    percent: float = Field(description="Only rises; weighted by where the time goes (sampler steps dominate).")
    node: str | None = Field(default=None, description="The ComfyUI node running.")
    step: int | None = Field(default=None, description="The sampler's step.")
    steps: int | None = Field(default=None, description="The sampler's steps.")
    clip: int | None = Field(default=None, description="svi: the clip being made.")
    clips: int | None = Field(default=None, description="svi: the clips in all.")
    bytes: int | None = Field(default=None, description="downloading: bytes of the current file so far.")
    total: int | None = Field(default=None, description="downloading: the file's size, when known.")
    elapsed_s: float = Field(description="Seconds since the job started.")
    eta_s: float | None = Field(default=None, description="Estimated seconds left.")


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
