"""Wan 2.2 14B image to video: one start image (and optionally an end image) and a prompt
become an mp4, wired as the official `video_wan2_2_14B_i2v` template (`workflows/i2v.json`);
with an end image, as `video_wan2_2_14B_flf2v`, whose quality preset samples differently."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import ImageLoader, JobContext, Plan
from .common import Prompt, check_frames
from .wan import Preset, Presets, Start, WanRequest

# From the official templates `video_wan2_2_14B_i2v.json` and `video_wan2_2_14B_flf2v.json`.
I2V_PRESETS: Presets = {"fast": Preset(4, 2, 1.0, 5.0, True), "quality": Preset(20, 10, 3.5, 5.0, False)}
FLF2V_PRESETS: Presets = {"fast": Preset(4, 2, 1.0, 5.0, True), "quality": Preset(20, 10, 4.0, 8.0, False)}


class I2VRequest(WanRequest):
    workflow: Literal["i2v"] = Field(description="Selects this workflow.")
    prompt: Prompt = Field(description="What happens in the video.")
    frames: int = Field(default=81, description="4n+1, 5 to 161.")
    end_image: str | None = Field(default=None, description="Optional last frame (first-last-frame video).")

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: int) -> int:
        return check_frames(value)


def plan(request: I2VRequest, ctx: JobContext, load_image: ImageLoader) -> Plan:
    presets = I2V_PRESETS if request.end_image is None else FLF2V_PRESETS
    start = Start.of(request, "i2v", presets, ctx, load_image)
    b = start.b
    b.set("positive", text=request.prompt)
    b.set("image_to_video", width=start.width, height=start.height, length=request.frames)
    if request.end_image is not None:
        _, end_ref = start.files.add(request.end_image, "end_image")
        b.retype("image_to_video", "WanFirstLastFrameToVideo")
        b.set("image_to_video", end_image=b.add("LoadImage", "end_image", image=end_ref))
    start.sampling.configure_samplers(b, start.seed)
    b.set("create_video", fps=float(request.fps))
    b.set("save", filename_prefix=ctx.output_prefix("i2v"))

    settings = {**start.settings(), "frames": request.frames, "fps": request.fps,
                "duration_s": round(request.frames / request.fps, 3)}
    return Plan(workflow="i2v", graph=b.graph, uploads=start.files.uploads, settings=settings,
                lora_nodes=start.lora_nodes)
