"""The published workflows our presets follow, read as data, and the same data read from our
graphs, so a test can compare them setting by setting.

- Official ComfyUI templates (UI format) from the installed `comfyui-workflow-templates-json`:
  either one subgraph whose `ComfySwitchNode`s pick the Lightning or the full preset
  (`video_wan2_2_14B_i2v`, the Qwen edit templates), or two groups side by side, one of them
  bypassed (`video_wan2_2_14B_flf2v`).
- Kijai's SVI 2.0 Pro example (`tests/references/`, where its source is written down).

A recipe is a flat dict of the settings that shape the output: node classes, model files,
LoRAs and strengths per expert, steps, split, cfg, shift, sampler, scheduler, size, length,
fps, how clips are joined, and how the video is saved.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PureWindowsPath
from typing import Any

REFERENCES_DIR = Path(__file__).resolve().parents[1] / "references"
KJ_SVI = "wan22_SVI_Pro_native_example_KJ.json"

# Nodes the UI uses to wire widgets, presets and notes; they are not part of an API-format graph.
UI_ONLY = {"PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "ComfySwitchNode", "ComfyMathExpression",
           "MarkdownNote", "Note", "SetNode", "GetNode"}
# Widget orders in the UI format ("control" is the UI's control_after_generate after a seed).
KSAMPLER_ADVANCED_WIDGETS = ["add_noise", "noise_seed", "control", "steps", "cfg", "sampler_name", "scheduler",
                             "start_at_step", "end_at_step", "return_with_leftover_noise"]
KSAMPLER_WIDGETS = ["seed", "control", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
# Where each loader class names its file (its first widget / this input), by role.
LOADERS = {"UNETLoader": "unet_name", "DiffusionModelLoaderKJ": "model_name", "CLIPLoader": "clip_name",
           "VAELoader": "vae_name"}
SAVES = {"SaveVideo", "SaveImage", "SaveImageAdvanced", "VHS_VideoCombine"}

Recipe = dict[str, Any]


def _file(name: str) -> str:
    # Kijai's workflow names files with his own Windows subfolders ("WanVideo\\SVI\\x.safetensors").
    return PureWindowsPath(name).name


@dataclass
class UiGraph:
    """One UI-format graph, flattened: nodes by id, links by id as (origin node, origin slot)."""

    nodes: dict[int, dict[str, Any]]
    links: dict[int, tuple[int, int]]
    lightning: bool  # which side of the preset switches to read

    def of_class(self, class_type: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes.values() if n["type"] == class_type]

    def one(self, class_type: str) -> dict[str, Any]:
        """The node of a class, when every node of that class has the same widgets."""
        found = self.of_class(class_type)
        assert found and all(n.get("widgets_values") == found[0].get("widgets_values") for n in found), class_type
        return found[0]

    def model_files(self) -> dict[str, str]:
        """File name -> URL of every model a node names (`properties.models`)."""
        return {m["name"]: m["url"] for n in self.nodes.values() for m in n.get("properties", {}).get("models", [])}

    def widget(self, node: dict[str, Any], names: list[str], name: str) -> Any:
        """An input's value: through its link (primitives, preset switches) or the widget."""
        for entry in node.get("inputs", []):
            if entry["name"] == name and entry.get("link") is not None:
                return self._value(entry["link"])
        return node["widgets_values"][names.index(name)]

    def _value(self, link: int) -> Any:
        origin = self.source(link)
        return None if origin is None else origin["widgets_values"][0]

    def source(self, link: int) -> dict[str, Any] | None:
        """The node a link comes from, through preset switches; None for a subgraph's own
        inputs (seed, prompt: set per request)."""
        if link not in self.links or self.links[link][0] < 0:
            return None  # a subgraph's own input, or a link of the graph around it
        origin = self.nodes[self.links[link][0]]
        if origin["type"] == "ComfySwitchNode":
            side = "on_true" if self.lightning else "on_false"
            [entry] = [e for e in origin["inputs"] if e["name"] == side]
            return self.source(entry["link"])
        return origin

    def upstream(self, node: dict[str, Any], name: str) -> dict[str, Any]:
        [entry] = [e for e in node["inputs"] if e["name"] == name]
        origin = self.source(entry["link"])
        assert origin is not None
        return origin

    def model_nodes(self, node: dict[str, Any]) -> list[dict[str, Any]]:
        """The nodes from a node's `model` input back to its loader."""
        chain = [self.upstream(node, "model")]
        while chain[-1]["type"] not in LOADERS:
            chain.append(self.upstream(chain[-1], "model"))
        return chain

    def reachable(self, roots: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Every node the roots depend on (preset switches resolved), the roots included."""
        seen: set[int] = set()
        todo = list(roots)
        while todo:
            node = todo.pop()
            if node["id"] in seen:
                continue
            seen.add(node["id"])
            yield node
            for entry in node.get("inputs", []):
                if entry.get("link") is not None and (origin := self.source(entry["link"])) is not None:
                    todo.append(origin)


@functools.cache
def _template(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("comfyui_workflow_templates_json").joinpath("templates", name).read_text())
    return data


def official(name: str, lightning: bool) -> UiGraph:
    """An official template with its Lightning (`lightning`) or full preset selected."""
    data = _template(name)
    subgraphs = data.get("definitions", {}).get("subgraphs", [])
    if subgraphs:
        [subgraph] = subgraphs
        links = {link["id"]: (link["origin_id"], link["origin_slot"]) for link in subgraph["links"]}
        return UiGraph({n["id"]: n for n in data["nodes"] + subgraph["nodes"]}, links, lightning)
    # Two copies of the graph side by side, one bypassed (mode 4); the Lightning one loads LoRAs.
    groups: dict[int, list[dict[str, Any]]] = {}
    for node in data["nodes"]:
        groups.setdefault(node["mode"], []).append(node)
    [group] = [g for g in groups.values() if any(n["type"] == "LoraLoaderModelOnly" for n in g) == lightning]
    links = {link[0]: (link[1], link[2]) for link in data["links"]}
    return UiGraph({n["id"]: n for n in group}, links, lightning)


@functools.cache
def _kj_svi() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REFERENCES_DIR / KJ_SVI).read_text())
    return data


def kj_svi() -> tuple[UiGraph, UiGraph, UiGraph]:
    """Kijai's SVI example: the outer graph (models, scheduler, anchor, video), the first clip's
    subgraph and an extension clip's (every later clip has the same settings but its prompt).
    Node and link ids repeat across these graphs, so each is read on its own."""
    data = _kj_svi()
    subgraphs = {s["id"]: s for s in data["definitions"]["subgraphs"]}
    titled = {n.get("title"): n["type"] for n in data["nodes"] if n["type"] in subgraphs}
    outer = UiGraph({n["id"]: n for n in data["nodes"]}, {link[0]: (link[1], link[2]) for link in data["links"]},
                    lightning=True)

    def inner(subgraph: dict[str, Any]) -> UiGraph:
        links = {link["id"]: (link["origin_id"], link["origin_slot"]) for link in subgraph["links"]}
        return UiGraph({n["id"]: n for n in subgraph["nodes"]}, links, lightning=True)

    return outer, inner(subgraphs[titled["Initial"]]), inner(subgraphs[titled["Extension"]])


# --- recipes of the references ---------------------------------------------------------------

def _loras(chain: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """LoRAs in the order they are applied (loader first), with their strengths."""
    return [(_file(n["widgets_values"][0]), round(n["widgets_values"][1], 6))
            for n in reversed(chain) if n["type"] == "LoraLoaderModelOnly"]


def _classes(nodes: Iterator[dict[str, Any]] | list[dict[str, Any]], subgraph_ids: set[str]) -> set[str]:
    return {n["type"] for n in nodes if n["type"] not in UI_ONLY and n["type"] not in subgraph_ids}


def wan_template_recipe(name: str, lightning: bool) -> Recipe:
    ref = official(name, lightning)
    high, low = sorted(ref.of_class("KSamplerAdvanced"),
                       key=lambda n: ref.widget(n, KSAMPLER_ADVANCED_WIDGETS, "start_at_step"))
    setting = functools.partial(ref.widget, names=KSAMPLER_ADVANCED_WIDGETS)
    chains = {"high": ref.model_nodes(high), "low": ref.model_nodes(low)}
    [conditioning] = [n for n in ref.nodes.values() if n["type"] in ("WanImageToVideo", "WanFirstLastFrameToVideo")]
    [save] = ref.of_class("SaveVideo")
    create = ref.one("CreateVideo")
    width, height, length, _batch = conditioning["widgets_values"]
    roots = [high, low, save,
             *(n for n in ref.nodes.values() if n["type"] in ("LoadImage", "VAEDecode", "CreateVideo"))]
    subgraph_ids = {s["id"] for s in _template(name).get("definitions", {}).get("subgraphs", [])}
    return {
        "classes": _classes(list(ref.reachable(roots)), subgraph_ids),
        "models": {f"unet_{k}": _file(c[-1]["widgets_values"][0]) for k, c in chains.items()}
        | {"clip": ref.one("CLIPLoader")["widgets_values"][0], "vae": ref.one("VAELoader")["widgets_values"][0]},
        "loras": {k: _loras(c) for k, c in chains.items()},
        "steps": setting(high, name="steps"), "split": setting(high, name="end_at_step"),
        "cfg": setting(high, name="cfg"), "cfg_low": setting(low, name="cfg"),
        "shift": {k: round(next(n for n in c if n["type"] == "ModelSamplingSD3")["widgets_values"][0], 6)
                  for k, c in chains.items()},
        "sampler": setting(high, name="sampler_name"), "scheduler": setting(high, name="scheduler"),
        "size": f"{width}x{height}", "length": length,
        "fps": ref.widget(create, ["fps"], "fps"), "join": None,
        "save": tuple(save["widgets_values"][1:]),
        "negative": _negative(ref),
    }


def kj_svi_recipe() -> Recipe:
    ref, first, clip = kj_svi()
    [high, low] = sorted(clip.of_class("SamplerCustomAdvanced"),
                         key=lambda n: clip.upstream(n, "latent_image")["type"] != "WanImageToVideoSVIPro")
    high_guider, low_guider = clip.upstream(high, "guider"), clip.upstream(low, "guider")
    assert clip.upstream(low, "noise")["type"] == "DisableNoise"
    models = {"high": _named_model(ref, "model_high"), "low": _named_model(ref, "model_low")}
    chains = {k: [m, *ref.model_nodes(m)] for k, m in models.items()}
    scheduler = ref.one("BasicScheduler")
    sched_name, steps, _denoise = scheduler["widgets_values"]
    [shift] = [n for n in ref.model_nodes(scheduler) if n["type"] == "ModelSamplingSD3"]
    resize = ref.one("ImageResizeKJv2")
    width, height, method, keep, _pad, crop = resize["widgets_values"][:6]
    svi = clip.one("WanImageToVideoSVIPro")
    join = clip.one("ImageBatchExtendWithOverlap")
    combine = ref.one("VHS_VideoCombine")["widgets_values"]
    nodes = [*ref.nodes.values(), *first.nodes.values(), *clip.nodes.values()]
    return {
        "classes": _classes(nodes, {s["id"] for s in _kj_svi()["definitions"]["subgraphs"]}),
        "models": {f"unet_{k}": _file(c[-1]["widgets_values"][0]) for k, c in chains.items()}
        | {"clip": _file(ref.one("CLIPLoader")["widgets_values"][0]),
           "vae": _file(ref.one("VAELoader")["widgets_values"][0])},
        "loras": {k: _loras(c) for k, c in chains.items()},
        "steps": steps, "split": ref.one("SplitSigmas")["widgets_values"][0],
        "cfg": high_guider["widgets_values"][0], "cfg_low": low_guider["widgets_values"][0],
        "shift": {"high": round(shift["widgets_values"][0], 6), "low": round(shift["widgets_values"][0], 6)},
        "sampler": ref.one("KSamplerSelect")["widgets_values"][0], "scheduler": sched_name,
        "size": f"{width}x{height} {method} {keep} {crop}", "length": svi["widgets_values"][0],
        "motion_latents": (first.one("WanImageToVideoSVIPro")["widgets_values"][1], svi["widgets_values"][1]),
        "fps": combine["frame_rate"], "join": tuple(join["widgets_values"]),
        "save": tuple(combine["format"].split("/")[1].split("-")[::-1]),
        "negative": _negative(clip),
    }


def _negative(ref: UiGraph) -> str:
    # The Wan default negative prompt, which every reference keeps.
    return str(next(n["widgets_values"][0] for n in ref.of_class("CLIPTextEncode")
                    if n["widgets_values"][0].startswith("色调艳丽")))


def _named_model(ref: UiGraph, name: str) -> dict[str, Any]:
    """What a `SetNode` stores under `name` (the example passes its models by name)."""
    [setter] = [n for n in ref.of_class("SetNode") if n["widgets_values"] == [name]]
    return ref.upstream(setter, setter["inputs"][0]["name"])


def qwen_template_recipe(model: str, lightning: bool) -> Recipe:
    name = f"image_qwen_image_edit_{model}.json"
    ref = official(name, lightning)
    [sampler] = ref.of_class("KSampler")
    setting = functools.partial(ref.widget, names=KSAMPLER_WIDGETS)
    chain = ref.model_nodes(sampler)
    [scale] = [ref.upstream(n, "pixels") for n in ref.of_class("VAEEncode")]
    roots = [sampler, *(n for n in ref.nodes.values() if n["type"] in SAVES | {"LoadImage", "VAEDecode"})]
    subgraph_ids = {s["id"] for s in _template(name)["definitions"]["subgraphs"]}
    return {
        "classes": _classes(list(ref.reachable(roots)), subgraph_ids),
        "models": {"unet": chain[-1]["widgets_values"][0], "clip": ref.one("CLIPLoader")["widgets_values"][0],
                   "clip_type": ref.one("CLIPLoader")["widgets_values"][1],
                   "vae": ref.one("VAELoader")["widgets_values"][0]},
        "model_chain": [n["type"] for n in chain],
        "loras": {"model": _loras(chain)},
        "steps": setting(sampler, name="steps"), "cfg": setting(sampler, name="cfg"),
        "shift": round(ref.one("ModelSamplingAuraFlow")["widgets_values"][0], 6),
        "cfg_norm": ref.one("CFGNorm")["widgets_values"][0],
        "sampler": setting(sampler, name="sampler_name"), "scheduler": setting(sampler, name="scheduler"),
        "denoise": setting(sampler, name="denoise"),
        "reference_method": sorted(n["widgets_values"][0]
                                   for n in ref.of_class("FluxKontextMultiReferenceLatentMethod")),
        "size": scale["type"],
    }


# --- recipes of our graphs -------------------------------------------------------------------

def our_model_nodes(graph: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes from one of our nodes' `model` input back to its loader."""
    nodes = []
    while node["class_type"] not in LOADERS:
        node = graph[node["inputs"]["model"][0]]
        nodes.append(node)
    return nodes


def _our_loras(chain: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(n["inputs"]["lora_name"], n["inputs"]["strength_model"])
            for n in reversed(chain) if n["class_type"] == "LoraLoaderModelOnly"]


def _titled(graph: dict[str, Any], title: str) -> dict[str, Any]:
    [node] = [n for n in graph.values() if n["_meta"]["title"] == title]
    return node


def _by_class(graph: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [n for n in graph.values() if n["class_type"] == class_type]


def our_wan_recipe(graph: dict[str, Any], clip: str = "") -> Recipe:
    """The recipe of one of our i2v graphs, or of clip `clip` ("#2") of an SVI graph."""
    high, low = _titled(graph, "sampler_high" + clip), _titled(graph, "sampler_low" + clip)
    chains = {"high": our_model_nodes(graph, high), "low": our_model_nodes(graph, low)}
    conditioning = _titled(graph, ("svi" if clip else "image_to_video") + clip)
    save = _titled(graph, "save_joined") if _by_class(graph, "ImageBatchExtendWithOverlap") else \
        _titled(graph, "save" + clip)
    scale = _by_class(graph, "ImageScale")
    joins = {(n["inputs"]["overlap"], n["inputs"]["overlap_side"], n["inputs"]["overlap_mode"])
             for n in _by_class(graph, "ImageBatchExtendWithOverlap")}
    recipe: Recipe = {
        "classes": {n["class_type"] for n in graph.values()},
        "models": {f"unet_{k}": c[-1]["inputs"]["unet_name"] for k, c in chains.items()}
        | {"clip": _titled(graph, "clip")["inputs"]["clip_name"], "vae": _titled(graph, "vae")["inputs"]["vae_name"]},
        "loras": {k: _our_loras(c) for k, c in chains.items()},
        "steps": high["inputs"]["steps"], "split": high["inputs"]["end_at_step"],
        "cfg": high["inputs"]["cfg"], "cfg_low": low["inputs"]["cfg"],
        "shift": {k: next(n for n in c if n["class_type"] == "ModelSamplingSD3")["inputs"]["shift"]
                  for k, c in chains.items()},
        "sampler": high["inputs"]["sampler_name"], "scheduler": high["inputs"]["scheduler"],
        "length": conditioning["inputs"]["length"],
        "fps": graph[save["inputs"]["video"][0]]["inputs"]["fps"],
        "join": joins.pop() if joins else None,
        "save": (save["inputs"]["format"], save["inputs"]["codec"]),
        "negative": _titled(graph, "negative")["inputs"]["text"],
    }
    assert not joins, "every join of a video is the same"
    assert (low["inputs"]["steps"], low["inputs"]["start_at_step"]) == (recipe["steps"], recipe["split"])
    assert (high["inputs"]["sampler_name"], high["inputs"]["scheduler"]) == (
        low["inputs"]["sampler_name"], low["inputs"]["scheduler"])
    if clip:
        s = scale[0]["inputs"]
        recipe["size"] = f"{s['width']}x{s['height']} {s['upscale_method']} crop {s['crop']}"
        # The first clip's, then a later clip's (the graph has at least two).
        recipe["motion_latents"] = (_titled(graph, "svi#1")["inputs"]["motion_latent_count"],
                                    _titled(graph, "svi#2")["inputs"]["motion_latent_count"])
    else:
        recipe["size"] = f"{conditioning['inputs']['width']}x{conditioning['inputs']['height']}"
    return recipe


def our_qwen_recipe(graph: dict[str, Any]) -> Recipe:
    sampler = _titled(graph, "sampler")
    chain = our_model_nodes(graph, sampler)
    clip = _titled(graph, "clip")["inputs"]
    return {
        "classes": {n["class_type"] for n in graph.values()},
        "models": {"unet": chain[-1]["inputs"]["unet_name"], "clip": clip["clip_name"], "clip_type": clip["type"],
                   "vae": _titled(graph, "vae")["inputs"]["vae_name"]},
        "model_chain": [n["class_type"] for n in chain],
        "loras": {"model": _our_loras(chain)},
        "steps": sampler["inputs"]["steps"], "cfg": sampler["inputs"]["cfg"],
        "shift": _titled(graph, "shift")["inputs"]["shift"],
        "cfg_norm": _titled(graph, "cfg_norm")["inputs"]["strength"],
        "sampler": sampler["inputs"]["sampler_name"], "scheduler": sampler["inputs"]["scheduler"],
        "denoise": sampler["inputs"]["denoise"],
        "reference_method": sorted(n["inputs"]["reference_latents_method"]
                                   for n in _by_class(graph, "FluxKontextMultiReferenceLatentMethod")),
        "size": graph[_titled(graph, "latent")["inputs"]["pixels"][0]]["class_type"],
    }


def differences(ours: Recipe, theirs: Recipe) -> dict[str, Any]:
    """Each setting that differs, as (ours, theirs); node classes as (only ours, only theirs)."""
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    diff: dict[str, Any] = {}
    for key in theirs:
        if key == "classes":
            if ours[key] != theirs[key]:
                diff[key] = (ours[key] - theirs[key], theirs[key] - ours[key])
        elif ours[key] != theirs[key]:
            diff[key] = (ours[key], theirs[key])
    return diff
