"""What Wan 2.2 I2V and SVI share: request fields, presets, and the two-expert sampling.

Wan 2.2 A14B denoises with two models: the high-noise expert runs the first steps (up to the
switch step) and hands its still-noisy latent to the low-noise expert for the rest, as the
official template wires it with two `KSamplerAdvanced` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from ..loras.request import LoraEntry, loras_field
from .base import ImageLoader, JobContext
from .common import PROMPT_MAX, InputFiles, TypedRequest, draw_seed
from .graph import GraphBuilder
from .loras import add_loras
from .sizing import SizeRule

# 832x480 is Wan's 480p; a default size keeps the input's aspect at this pixel count.
SIZE = SizeRule(multiple=16, low=256, high=1280, area=832 * 480)
# The official template's negative prompt, read from our copy of its graph.
DEFAULT_NEGATIVE: str = GraphBuilder.from_template("i2v").inputs("negative")["text"]


@dataclass(frozen=True)
class Preset:
    steps: int
    switch: int
    cfg: float
    shift: float
    lightning: bool


# A workflow's presets by name; each holds its reference's values (workflows/README.md names them).
Presets = dict[str, Preset]


class WanRequest(TypedRequest):
    workflow: str
    image: str = Field(min_length=1, description="The start image: https:// or s3:// URL, data URI or base64.")
    negative_prompt: str = Field(default=DEFAULT_NEGATIVE, max_length=PROMPT_MAX,
                                 description="What the video should not show (default: the official template's).")
    width: int | None = Field(default=None, description="Multiple of 16, 256 to 1280; default from the image.")
    height: int | None = Field(default=None, description="Multiple of 16, 256 to 1280; default from the image.")
    fps: int = Field(default=16, ge=1, le=60, description="Frames per second of the video.")
    steps: int | None = Field(default=None, ge=2, le=100, description="Overrides the preset; switch at half.")
    cfg: float | None = Field(default=None, ge=0.0, le=30.0, description="Overrides the preset.")
    shift: float | None = Field(default=None, gt=0.0, le=100.0, description="Overrides the preset.")
    loras: list[LoraEntry] = loras_field()

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        return SIZE.check(value)


@dataclass(frozen=True)
class Sampling:
    preset: str
    steps: int
    switch: int
    cfg: float
    shift: float
    lightning: bool

    @classmethod
    def of(cls, request: WanRequest, presets: Presets) -> Sampling:
        preset = presets[request.preset]
        steps = request.steps or preset.steps
        switch = preset.switch if request.steps is None else steps // 2
        cfg = preset.cfg if request.cfg is None else request.cfg
        shift = preset.shift if request.shift is None else request.shift
        return cls(request.preset, steps, switch, cfg, shift, preset.lightning)

    def settings(self) -> dict[str, Any]:
        return {"preset": self.preset, "steps": self.steps, "switch_step": self.switch,
                "cfg": self.cfg, "shift": self.shift}

    def configure_models(self, b: GraphBuilder) -> None:
        if not self.lightning:
            b.bypass("lora_high", through="model")
            b.bypass("lora_low", through="model")
        b.set("shift_high", shift=self.shift)
        b.set("shift_low", shift=self.shift)

    def configure_samplers(self, b: GraphBuilder, seed: int, suffix: str = "") -> None:
        b.set("sampler_high" + suffix, noise_seed=seed, steps=self.steps, cfg=self.cfg, end_at_step=self.switch)
        # The low-noise pass adds no noise of its own; its seed input is unused.
        b.set("sampler_low" + suffix, steps=self.steps, cfg=self.cfg, start_at_step=self.switch,
              end_at_step=self.steps)


def models(request: WanRequest) -> tuple[str, str]:
    return request.workflow, request.preset


@dataclass
class Start:
    """What every Wan plan begins with: the start image uploaded, the size and sampling
    resolved, the seed drawn, and the template's shared nodes (models, negative) set."""

    files: InputFiles
    b: GraphBuilder
    width: int
    height: int
    sampling: Sampling
    seed: int
    lora_nodes: dict[str, int]

    @classmethod
    def of(cls, request: WanRequest, template: str, presets: Presets, ctx: JobContext,
           load_image: ImageLoader) -> Start:
        files = InputFiles(ctx, load_image)
        image, ref = files.add(request.image, "image")
        width, height = SIZE.resolve(request.width, request.height, image.width / image.height)
        sampling = Sampling.of(request, presets)
        b = GraphBuilder.from_template(template)
        b.set("start_image", image=ref)
        b.set("negative", text=request.negative_prompt)
        sampling.configure_models(b)
        # The experts' model chains end in their shift nodes; a request's LoRAs go just before.
        lora_nodes = add_loras(b, request.loras, {"high": "shift_high", "low": "shift_low"})
        return cls(files, b, width, height, sampling, draw_seed(request.seed), lora_nodes)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.sampling.settings(), "width": self.width, "height": self.height}
