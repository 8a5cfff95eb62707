"""Qwen Image Edit (2511, or 2509 by `model`): one to three images and an instruction become a
PNG, wired as the official `image_qwen_image_edit_2511` / `_2509` templates
(`workflows/qwen_edit_2511.json`, `qwen_edit_2509.json`).

As in the templates, `FluxKontextImageScale` scales the first image to the size of its list
nearest to the image's aspect (about 1 MP). A request that names a width or height gets that
size instead, through `ImageScale` (lanczos, center crop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from ..loras.request import LoraEntry, Target, loras_field
from .base import ImageLoader, JobContext, Plan
from .common import PROMPT_MAX, InputFiles, Prompt, TypedRequest, draw_seed
from .graph import GraphBuilder
from .loras import add_loras
from .sizing import SizeRule, kontext_size

SIZE = SizeRule(multiple=8, low=256, high=2048, area=1024 * 1024)
Model = Literal["2511", "2509"]


@dataclass(frozen=True)
class Preset:
    steps: int
    cfg: float
    lightning: bool


# From the official templates: 2511 quality runs 40 steps, 2509 quality 20.
PRESETS: dict[tuple[str, str], Preset] = {
    ("2511", "fast"): Preset(4, 1.0, True),
    ("2511", "quality"): Preset(40, 4.0, False),
    ("2509", "fast"): Preset(4, 1.0, True),
    ("2509", "quality"): Preset(20, 4.0, False),
}


def _no_target_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update({"type": "null", "description": "Not for Qwen Image Edit (one model): leave it out."})


class QwenLora(LoraEntry):
    # Accepted as a value so that the error explains; the JSON Schema says it is not for Qwen.
    target: Target | None = Field(default=None, json_schema_extra=_no_target_schema)

    @field_validator("target")
    @classmethod
    def _no_target(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("Qwen Image Edit has one model; target is for Wan's two experts (leave it out)")
        return None


class QwenEditRequest(TypedRequest):
    workflow: Literal["qwen_edit"] = Field(description="Selects this workflow.")
    images: list[str] = Field(min_length=1, max_length=3, description="1 to 3 images; the first is edited.")
    prompt: Prompt = Field(description="The edit instruction.")
    negative_prompt: str = Field(default="", max_length=PROMPT_MAX,
                                 description="What the edited image should not show.")
    width: int | None = Field(default=None, description="Multiple of 8, 256 to 2048; default: the "
                              "FluxKontextImageScale size nearest the first image's aspect (about 1 MP).")
    height: int | None = Field(default=None, description="Multiple of 8, 256 to 2048; default: the "
                               "FluxKontextImageScale size nearest the first image's aspect (about 1 MP).")
    model: Model = Field(default="2511", description="The Qwen Image Edit release: 2511 or 2509.")
    steps: int | None = Field(default=None, ge=1, le=100, description="Overrides the preset.")
    cfg: float | None = Field(default=None, ge=0.0, le=30.0, description="Overrides the preset.")
    loras: list[QwenLora] = loras_field()

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        return SIZE.check(value)

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_text(cls, value: Any) -> Any:
        # Callers naturally write 2511 as a number.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def models(request: QwenEditRequest) -> tuple[str, str]:
    return f"qwen_edit:{request.model}", request.preset


def plan(request: QwenEditRequest, ctx: JobContext, load_image: ImageLoader) -> Plan:
    files = InputFiles(ctx, load_image)
    first, first_ref = files.add(request.images[0], "images[0]")
    refs = [first_ref] + [files.add(value, f"images[{i}]")[1]
                          for i, value in enumerate(request.images[1:], start=1)]
    preset = PRESETS[(request.model, request.preset)]
    steps = request.steps or preset.steps
    cfg = preset.cfg if request.cfg is None else request.cfg
    seed = draw_seed(request.seed)

    b = GraphBuilder.from_template(f"qwen_edit_{request.model}")
    b.set("image1", image=refs[0])
    aspect = first.width / first.height
    if request.width is None and request.height is None:
        width, height = kontext_size(aspect)
    else:
        width, height = SIZE.resolve(request.width, request.height, aspect)
        b.retype("scale", "ImageScale")
        b.set("scale", upscale_method="lanczos", width=width, height=height, crop="center")
    for i, ref in enumerate(refs[1:], start=2):
        loaded = b.add("LoadImage", f"image{i}", image=ref)
        b.set("positive", **{f"image{i}": loaded})
        b.set("negative", **{f"image{i}": loaded})
    b.set("positive", prompt=request.prompt)
    b.set("negative", prompt=request.negative_prompt)
    if not preset.lightning:
        b.bypass("lora", through="model")
    b.set("sampler", seed=seed, steps=steps, cfg=cfg)
    # The sampler reads the end of the model chain, after the preset's LoRA.
    lora_nodes = add_loras(b, request.loras, {"model": "sampler"})
    b.set("save", filename_prefix=ctx.output_prefix("qwen_edit"))

    settings = {"seed": seed, "preset": request.preset, "model": request.model, "steps": steps, "cfg": cfg,
                "width": width, "height": height}
    return Plan(workflow="qwen_edit", graph=b.graph, uploads=files.uploads, settings=settings,
                lora_nodes=lora_nodes)
