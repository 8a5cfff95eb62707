"""Stable Video Infinity 2.0 Pro: a long video as a chain of Wan 2.2 I2V clips.

Every clip is one I2V run with the SVI LoRAs, conditioned by KJNodes' `WanImageToVideoSVIPro`
on the anchor (the start image's latent) and on the last `motion_latents` latents of the
previous clip; each clip has its own prompt and seed. All clips are one ComfyUI graph
(`workflows/svi.json` for what they share, `workflows/svi_clip.json` once per clip): each
clip's own SaveVideo is a partial output the caller gets even when the job is cancelled
later, and a final SaveVideo writes the clips joined.

A clip's first frame re-renders the anchor and its next `4 * motion_latents` frames re-render
the previous clip's tail, so the join cross-fades those `1 + 4 * motion_latents` frames of
every clip after the first into the previous clip's last ones (KJNodes'
`ImageBatchExtendWithOverlap`, `linear_blend`, as Kijai's SVI 2.0 Pro example joins them); the
partials are the clips as generated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from .base import ImageLoader, JobContext, Plan
from .common import Prompt, check_frames, one_of
from .graph import GraphBuilder, Link
from .raw import MAX_SEED
from .wan import Preset, Presets, Sampling, Start, WanRequest

MAX_CLIPS = 20
# fast: Kijai's `wan22_SVI_Pro_native_example_KJ.json` (its distill LoRAs are in svi.json);
# quality: no published SVI reference without distill LoRAs, so the i2v template's quality values.
SVI_PRESETS: Presets = {"fast": Preset(6, 3, 1.0, 5.0, True), "quality": Preset(20, 10, 3.5, 5.0, False)}
# How the example joins two clips' frames (an ImageBatchExtendWithOverlap's widgets besides overlap).
JOIN_MODE = {"overlap_side": "source", "overlap_mode": "linear_blend"}
EXTENDED_IMAGES = 2  # ImageBatchExtendWithOverlap's output holding the joined frames
CLIP_STRIDE = 100  # clip k's nodes are numbered from CLIP_STRIDE * k (svi_clip.json's own ids are 101+)


class SviRequest(WanRequest):
    workflow: Literal["svi"] = Field(description="Selects this workflow.")
    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=MAX_CLIPS,
                                         description="One prompt per clip.")
    # The cross-field rules below sit on fields (validated in this order, defaults included)
    # so that each error names the field it is about.
    prompt: Prompt | None = Field(default=None, validate_default=True,
                                  description="The same prompt for every clip (with `clips`).")
    clips: int | None = Field(default=None, ge=1, le=MAX_CLIPS, description="With `prompt`: how many clips.")
    frames_per_clip: int = Field(default=81, description="4n+1, 5 to 161.")
    motion_latents: int = Field(default=1, ge=1, le=8, validate_default=True,
                                description="Latents of the previous clip that carry its motion into the next.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt_source(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        return one_of(prompt, info, "prompts", "required: give prompt (with clips) or prompts (one per clip)",
                      "give prompt or prompts, not both")

    @field_validator("clips")
    @classmethod
    def _clips_with_prompt(cls, clips: int | None, info: ValidationInfo) -> int | None:
        if clips is not None and info.data.get("prompts") is not None:
            raise ValueError("goes with prompt; prompts already makes one clip per entry")
        return clips

    @field_validator("frames_per_clip")
    @classmethod
    def _frames(cls, value: int) -> int:
        return check_frames(value)

    @field_validator("motion_latents")
    @classmethod
    def _fits_clip(cls, value: int, info: ValidationInfo) -> int:
        frames = info.data.get("frames_per_clip")
        if frames is not None and 1 + 4 * value >= frames:
            raise ValueError(f"{value} overlaps {1 + 4 * value} frames of each clip, "
                             f"which must be fewer than frames_per_clip ({frames})")
        return value

    @property
    def overlap(self) -> int:
        return 1 + 4 * self.motion_latents

    def clip_prompts(self) -> list[str]:
        if self.prompts is not None:
            return self.prompts
        assert self.prompt is not None
        return [self.prompt] * (self.clips or 1)


def plan(request: SviRequest, ctx: JobContext, load_image: ImageLoader) -> Plan:
    start = Start.of(request, "svi", SVI_PRESETS, ctx, load_image)
    b = start.b
    b.set("scale_start", width=start.width, height=start.height)
    prompts = request.clip_prompts()
    seeds = [(start.seed + k) % (MAX_SEED + 1) for k in range(len(prompts))]

    result = Plan(workflow="svi", graph=b.graph, uploads=start.files.uploads, clips=len(prompts),
                  lora_nodes=start.lora_nodes)
    segments = []
    for k, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True), start=1):
        segments.append(_add_clip(b, request, start.sampling, k, prompt, seed, ctx, result))
    if len(prompts) > 1:
        joined = b.add("CreateVideo", "create_joined", images=join_clips(b, segments, request.overlap),
                       fps=float(request.fps))
        b.add("SaveVideo", "save_joined", video=joined, filename_prefix=ctx.output_prefix("svi"),
              format="mp4", codec="h264")
    else:
        # One clip is the whole video: its own save is the result, not a partial.
        b.set("save#1", filename_prefix=ctx.output_prefix("svi"))
        result.partial_nodes.clear()

    frames = request.frames_per_clip + (len(prompts) - 1) * (request.frames_per_clip - request.overlap)
    result.settings = {
        **start.settings(), "seeds": seeds, "clips": len(prompts), "frames_per_clip": request.frames_per_clip,
        "motion_latents": request.motion_latents, "overlap_frames": request.overlap, "frames": frames,
        "fps": request.fps, "duration_s": round(frames / request.fps, 3),
    }
    return result


def _add_clip(b: GraphBuilder, request: SviRequest, sampling: Sampling, k: int, prompt: str, seed: int,
              ctx: JobContext, result: Plan) -> Link:
    """Add clip `k` (from 1) to the chain; returns its decoded frames."""
    sfx = f"#{k}"
    ids = b.merge("svi_clip", id_offset=CLIP_STRIDE * (k - 1), suffix=sfx, local_from=CLIP_STRIDE)
    b.set("positive" + sfx, text=prompt)
    b.set("svi" + sfx, length=request.frames_per_clip, motion_latent_count=0)
    if k > 1:
        b.set("svi" + sfx, prev_samples=b.out(f"sampler_low#{k - 1}"), motion_latent_count=request.motion_latents)
    sampling.configure_samplers(b, seed, sfx)
    b.set("create_video" + sfx, fps=float(request.fps))
    b.set("save" + sfx, filename_prefix=ctx.output_prefix(f"svi_clip{k:02d}"))
    result.node_clip.update(dict.fromkeys(ids, k))
    result.partial_nodes[b.id("save" + sfx)] = k
    return b.out("decode" + sfx)


def join_clips(b: GraphBuilder, segments: list[Link], overlap: int) -> Link:
    """Join clips' frames, each clip's first `overlap` frames cross-faded into the previous
    clip's last ones; returns the link to the joined frames.

    A balanced tree of two-input joins, where the example chains them: ComfyUI keeps every
    node's output for the whole prompt, so a chain would hold O(clips^2) frames in memory, a
    tree O(clips log clips). A join blends only the `overlap` frames at its seam, the last of
    its left side (one clip's end) with the first of its right side (the next clip's start),
    so the tree gives the chain's frames whenever a clip has at least 2 * overlap frames.
    """
    level = 0
    while len(segments) > 1:
        level += 1
        pairs: list[Link] = []
        for i in range(0, len(segments) - 1, 2):
            title = f"join{level}_{i // 2}"
            b.add("ImageBatchExtendWithOverlap", title, source_images=segments[i], new_images=segments[i + 1],
                  overlap=overlap, **JOIN_MODE)
            pairs.append(b.out(title, EXTENDED_IMAGES))
        segments = pairs + segments[len(pairs) * 2:]
    return segments[0]
