"""The ComfyUI the images ship (`workflows/comfyui.json`) against the one the tests run (0.3.64,
whose schemas `tests/fakes/comfyui/object_info.json` records), input by input, for every node
class our typed graphs use. The shipped side is `tests/references/comfyui-pinned-node-inputs.json`:
each class's inputs as read at the pinned commit, or why they could not be read
(`docs/comfyui-versions.md` says how to read them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffbox.warmup import request_for
from diffbox.workflows.graph import WORKFLOWS_DIR
from tests.fakes.comfyui.validate import (
    EXTRA_SCHEMAS_DIR,
    MODEL_INPUTS_BY_CLASS,
    MODEL_INPUTS_BY_NAME,
    OBJECT_INFO_PATH,
    is_link,
    load_extra_schemas,
)
from tests.unit.workflow_cases import CASES, plan_of

REFERENCE = Path(__file__).resolve().parents[1] / "references" / "comfyui-pinned-node-inputs.json"
RECORDED_STATS = OBJECT_INFO_PATH.parent / "recorded" / "GET_system_stats.json"
# Warm-up requests are the smallest our graphs get (256x256, 5 frames, 1-2 steps).
WARMUPS = ["i2v:fast", "i2v:quality", "svi:fast", "svi:quality", "qwen_edit:fast:2511", "qwen_edit:quality:2509"]
# What an input's schema says that ComfyUI or its frontend acts on (tooltips and display hints left out).
FIELDS = ("required", "type", "default", "min", "max", "step", "options")

# Inputs of the pinned release that differ from 0.3.64's, and why we accept each. A difference not
# listed here fails, and so does an entry here that the pinned schema, once read, does not show.
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    # Qwen Edit 2511's reference method came with Comfy-Org/ComfyUI PR #11340 (merged 2025-12-16),
    # after 0.3.64; the fake serves the newer option list (tests/fakes/comfyui/extra_schemas/) and the
    # real leg expects 0.3.64 to refuse it (tests/e2e/test_graph_validation.py).
    ("FluxKontextMultiReferenceLatentMethod", "reference_latents_method"): "index_timestep_zero",
}

Schema = dict[str, dict[str, Any]]  # input name -> the FIELDS its schema gives


def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REFERENCE.read_text())
    return data


def recorded_schemas() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(OBJECT_INFO_PATH.read_text())
    return data


def graphs() -> Iterator[dict[str, Any]]:
    """Every graph the typed workflows build: each request shape, and the warm-ups."""
    for _, payload in CASES:
        yield plan_of(payload).graph
    for spec in WARMUPS:
        yield plan_of(request_for(spec), 256, 256).graph


def templates() -> Iterator[dict[str, Any]]:
    """The graph templates in workflows/ (API format)."""
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(n, dict) and "class_type" in n for n in data.values()):
            yield data


def is_file_input(class_type: str, name: str) -> bool:
    """A COMBO that lists files on disk (weights, input images): empty in a recording, so its
    options are no schema fact; whether the files exist is checked with the weights."""
    return (class_type, name) in MODEL_INPUTS_BY_CLASS or name in MODEL_INPUTS_BY_NAME


def inputs(class_type: str, entry: dict[str, Any]) -> Schema:
    """An object_info entry's inputs as FIELDS: a COMBO's list as `options` whichever way the
    node declares it."""
    schema: Schema = {}
    for category in ("required", "optional"):
        for name, spec in (entry.get("input", {}).get(category) or {}).items():
            kind, extra = spec[0], (spec[1] if len(spec) > 1 else {})
            field = {"required": category == "required", "type": "COMBO" if isinstance(kind, list) else kind,
                     **{k: extra[k] for k in ("default", "min", "max", "step", "options") if k in extra}}
            if isinstance(kind, list):
                field["options"] = kind
            if is_file_input(class_type, name):
                field.pop("options", None)
            schema[name] = field
    return schema


def differences(pinned: Schema, tested: Schema) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Input -> field -> (pinned, tested), for each field that differs (an absent input is {})."""
    found = {}
    for name in sorted(pinned.keys() | tested.keys()):
        ours, theirs = pinned.get(name, {}), tested.get(name, {})
        fields = {f: (ours.get(f), theirs.get(f)) for f in FIELDS if ours.get(f) != theirs.get(f)}
        if fields:
            found[name] = fields
    return found


def refusals(node: dict[str, Any], schema: Schema) -> list[str]:
    """Why ComfyUI's /prompt validation would refuse this node's inputs under this schema."""
    found = [f"{name}: required, not set" for name, spec in schema.items()
             if spec["required"] and name not in node["inputs"]]
    for name, value in node["inputs"].items():
        spec = schema.get(name)
        if spec is None:
            found.append(f"{name}: no such input")
        elif is_link(value):
            continue
        elif "options" in spec and value not in spec["options"]:
            found.append(f"{name}: {value!r} not in {spec['options']}")
        elif spec["type"] in ("INT", "FLOAT") and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            found.append(f"{name}: {value!r} is no {spec['type']}")
        elif ("min" in spec and value < spec["min"]) or ("max" in spec and value > spec["max"]):
            found.append(f"{name}: {value!r} outside {spec.get('min')}..{spec.get('max')}")
    return found


def pinned_schemas() -> dict[str, Schema]:
    """The inputs of each class read at the pinned commit."""
    return {c: inputs(c, e) for c, e in reference()["classes"].items() if e["status"] == "read"}


def skip_the_unread() -> None:
    """Says, with the reasons, which classes the checks above could not cover."""
    unread = sorted(c for c, e in reference()["classes"].items() if e["status"] == "unread")
    if unread:
        pytest.skip(f"{len(unread)} classes not read at the pinned commit (why: in {REFERENCE.name}), "
                    f"so not compared: {', '.join(unread)}")


def test_the_reference_covers_exactly_the_node_classes_our_graphs_use() -> None:
    used = {n["class_type"] for graph in [*graphs(), *templates()] for n in graph.values()}
    assert set(reference()["classes"]) == used


def test_the_reference_is_of_the_pinned_and_the_tested_releases() -> None:
    ref, pins = reference(), json.loads((WORKFLOWS_DIR / "comfyui.json").read_text())
    assert (ref["pinned"]["repo"], ref["pinned"]["commit"]) == (pins["comfyui"]["repo"], pins["comfyui"]["commit"])
    stats = json.loads(RECORDED_STATS.read_text())["body"]["system"]
    assert ref["tested"]["version"] == stats["comfyui_version"]
    custom = {node["repo"]: node["commit"] for node in pins["custom_nodes"]}
    for class_type, entry in ref["classes"].items():
        assert entry["status"] in ("read", "unread", "same_pin"), class_type
        assert entry["file"] and (entry["status"] == "read") == ("input" in entry), class_type
        if entry["status"] == "read":
            assert entry["commit"] == ref["pinned"]["commit"], class_type
        elif entry["status"] == "unread":
            assert entry["why"], class_type
        else:  # a custom node's schema is the same where its commit is
            assert entry["commit"] == custom[entry["repo"]], class_type


def test_each_input_is_the_tested_releases_but_for_the_known_differences() -> None:
    recorded = recorded_schemas()
    found = {c: set(differences(schema, inputs(c, recorded[c]))) for c, schema in pinned_schemas().items()}
    known = {c: {name for k, name in KNOWN_DIFFERENCES if k == c} for c in found}
    assert found == known
    skip_the_unread()


def test_the_pinned_release_takes_every_input_our_graphs_set() -> None:
    schemas = pinned_schemas()
    refused = {f"{node['class_type']} {node['_meta']['title']}: {reason}" for graph in graphs()
               for node in graph.values() if node["class_type"] in schemas
               for reason in refusals(node, schemas[node["class_type"]])}
    assert refused == set()
    skip_the_unread()


def test_the_fake_stands_in_for_the_pinned_release_only_where_the_known_differences_say() -> None:
    """The newer schemas the fake serves (extra_schemas/) differ from 0.3.64's by the listed inputs."""
    recorded = recorded_schemas()
    found = {(c, name) for c, entry in load_extra_schemas(EXTRA_SCHEMAS_DIR).items()
             for name in differences(inputs(c, entry), inputs(c, recorded[c]))}
    assert found == set(KNOWN_DIFFERENCES)


def test_the_checks_find_a_changed_input() -> None:
    """As if the pinned release had raised `length`'s minimum and dropped `batch_size`: both checks
    fail on what our graphs set (the warm-up asks for 5 frames)."""
    tested = inputs("WanImageToVideo", recorded_schemas()["WanImageToVideo"])
    changed = {name: dict(spec) for name, spec in tested.items() if name != "batch_size"}
    changed["length"]["min"] = 17
    assert differences(changed, tested) == {"batch_size": {"required": (None, True), "type": (None, "INT"),
                                                           "default": (None, 1), "min": (None, 1),
                                                           "max": (None, 4096)},
                                            "length": {"min": (17, 1)}}
    refused = {reason for graph in graphs() for node in graph.values()
               if node["class_type"] == "WanImageToVideo" for reason in refusals(node, changed)}
    assert refused == {"batch_size: no such input", "length: 5 outside 17..16384"}
