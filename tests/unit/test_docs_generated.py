"""The docs' facts about the code are the code's: the configuration tables, the API's fields
and RunPod's Hub files are what `python -m diffbox.docgen` writes from it, every setting says
what it does, and every variable a setting names is the one the worker reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from diffbox import docgen, hub
from diffbox.config import S3Settings, Settings, env_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(docgen.expected(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_committed_file_is_what_the_command_writes(path: Path) -> None:
    assert path.exists() and path.read_text() == docgen.expected(ROOT)[path], (
        f"{path.relative_to(ROOT)} differs from the code: run `uv run python -m diffbox.docgen` and commit it")


def test_the_pages_carry_the_generated_blocks() -> None:
    pages = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    assert "<!-- generated: settings -->" in pages["configuration.md"]
    assert "<!-- generated: s3-settings -->" in pages["storage.md"]
    assert "<!-- generated: requests -->" in pages["api.md"] and "<!-- generated: results -->" in pages["api.md"]
    assert "DIFFBOX_JOB_TIMEOUT_S" in pages["configuration.md"] and "AWS_SESSION_TOKEN" in pages["storage.md"]


def test_a_drifted_block_is_written_anew() -> None:
    stale = "before\n<!-- generated: s3-settings -->\n| stale |\n<!-- end generated -->\nafter\n"
    fresh = docgen.render_page(stale)
    assert "| stale |" not in fresh and "`DIFFBOX_S3_PART_SIZE_MB` | `16` |" in fresh
    assert fresh.startswith("before\n") and fresh.endswith("<!-- end generated -->\nafter\n")


SETTINGS: list[tuple[type[BaseModel], str]] = [(m, n) for m in (Settings, S3Settings) for n in m.model_fields]


@pytest.mark.parametrize(("model", "name"), [s for s in SETTINGS if s[1] != "s3"], ids=lambda v: str(v))
def test_every_setting_names_its_variable_and_says_what_it_does(model: type[BaseModel], name: str) -> None:
    field = model.model_fields[name]
    assert env_of(field).get("env"), f"{name}: no variable"
    assert field.description and len(field.description) > 10, f"{name}: no description"


def _sample(field_default: object, annotation: object) -> str:
    """A value the setting takes that differs from its default, as its variable would carry it."""
    if annotation is bool:
        return "0" if field_default else "1"
    if annotation in (int, int | None):
        return "7"
    if annotation in (float, float | None):
        return "7.5"
    return "adaptive" if "adaptive" in str(annotation) else "WARNING" if "WARNING" in str(annotation) else \
        "human" if "human" in str(annotation) else "vllm" if "vllm" in str(annotation) else "sample-value"


@pytest.mark.parametrize("name", [n for n in Settings.model_fields if n != "s3"])
def test_each_variable_reaches_its_setting(name: str) -> None:
    field = Settings.model_fields[name]
    value = _sample(field.get_default(call_default_factory=True), field.annotation)
    settings = Settings.from_env({env_of(field)["env"]: value})
    assert getattr(settings, name) != Settings.from_env({}).__getattribute__(name), name


@pytest.mark.parametrize("name", [n for n in S3Settings.model_fields if n != "bucket"])
def test_each_s3_variable_reaches_its_setting(name: str) -> None:
    field = S3Settings.model_fields[name]
    env = {"DIFFBOX_S3_BUCKET": "my-bucket"}
    base = Settings.from_env(env).s3
    value = "8" if field.annotation is int else _sample(field.default, field.annotation)
    if name == "endpoint_url":
        value = "http://127.0.0.1:9000"
    if name in ("secret_access_key", "session_token"):  # read only with their key id, from the same pair
        env["AWS_ACCESS_KEY_ID"] = "AKIDEXAMPLE"
    settings = Settings.from_env({**env, env_of(field)["env"]: value}).s3
    assert settings is not None and base is not None
    assert getattr(settings, name) != getattr(base, name), name


def test_the_hub_listing_offers_every_setting_a_user_sets() -> None:
    listing = json.loads((ROOT / ".runpod/hub.json").read_text())
    keys = [entry["key"] for entry in listing["config"]["env"]]
    for model in (Settings, S3Settings):
        for field in model.model_fields.values():
            spec = env_of(field)
            if "env" in spec:
                assert (spec["env"] in keys) == (not spec["local"]), spec["env"]
    for entry in listing["config"]["env"]:
        assert set(entry["input"]) == {"name", "type", "description", "default", "advanced"}
        assert entry["input"]["type"] in ("string", "number", "boolean")


def test_the_hub_gpus_hold_the_weights_the_image_bakes() -> None:
    listing = json.loads((ROOT / ".runpod/hub.json").read_text())
    memory = dict(hub.POOLS)
    need = hub.resident_gb(ROOT)
    assert need > 24  # i2v's weights (about 38 GB): a 24 GB card would offload
    assert all(memory[pool] > need for pool in listing["config"]["gpuIds"].split(","))


def test_the_hub_test_is_the_model_free_graph() -> None:
    tests = json.loads((ROOT / ".runpod/tests.json").read_text())
    request = json.loads((ROOT / "test_input.json").read_text())["input"]
    assert tests["tests"][0]["input"] == request
    classes = {node["class_type"] for node in request["workflow"].values()}
    assert not any("Loader" in c for c in classes), classes  # runs without weights
