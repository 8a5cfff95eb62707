"""Request fields and plan steps every typed workflow shares."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal, TypeVar

from pydantic import Field, ValidationInfo

from ..inputs.media import InputImage
from ..schemas import OutputOptions, Strict
from .base import ImageLoader, JobContext, Upload
from .raw import MAX_SEED

PROMPT_MAX = 2000
Prompt = Annotated[str, Field(min_length=1, max_length=PROMPT_MAX)]
PresetName = Literal["fast", "quality"]


class TypedRequest(Strict):
    preset: PresetName = Field(
        default="fast", description="fast: the 4-step Lightning LoRA(s); quality: the full step count without it."
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random when absent; returned.")
    output: OutputOptions | None = Field(default=None, description="Where the outputs go.")


def draw_seed(seed: int | None) -> int:
    return secrets.randbelow(MAX_SEED + 1) if seed is None else seed


def check_frames(value: int, low: int = 5, high: int = 161) -> int:
    # Wan's VAE packs 4 frames into each latent after the first.
    if value % 4 != 1 or not low <= value <= high:
        raise ValueError(f"must be 4n+1 between {low} and {high}, got {value}")
    return value


T = TypeVar("T")


def one_of(value: T, info: ValidationInfo, other: str, missing: str, both: str) -> T:
    """Validate the second of two fields of which exactly one must be given (validated after
    `other`, defaults included), so that the error names a field."""
    if other not in info.data:  # the other field was refused itself; that error says enough
        return value
    if value is None and info.data[other] is None:
        raise ValueError(missing)
    if value is not None and info.data[other] is not None:
        raise ValueError(both)
    return value


class InputFiles:
    """Decodes a request's images and names the uploads that carry them to ComfyUI."""

    def __init__(self, ctx: JobContext, load_image: ImageLoader) -> None:
        self.ctx = ctx
        self.load_image = load_image
        self.uploads: list[Upload] = []

    def add(self, value: str, field: str) -> tuple[InputImage, str]:
        """Decode one image; returns it and the name a `LoadImage` node gives it."""
        image = self.load_image(value, field)
        upload = Upload.of(image)
        if all(u.name != upload.name for u in self.uploads):
            self.uploads.append(upload)
        return image, self.ctx.input_ref(upload.name)
