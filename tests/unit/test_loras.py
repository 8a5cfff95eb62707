"""LoRA entries, the safetensors check and the cache (diffbox/loras), on real files and processes."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import multiprocessing
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from diffbox.errors import JobError
from diffbox.loras.cache import LoraCache
from diffbox.loras.header import NotALora, check_lora
from diffbox.loras.request import HfSource, HttpsSource, S3Source, parse_source
from diffbox.workflows import parse
from diffbox.workflows.loras import bind, placeholder
from tests.fakes.comfyui.validate import Schemas, validate_prompt
from tests.lorafiles import lora_bytes, pickle_bytes, safetensors_bytes
from tests.unit.test_workflows_graphs import comfy_schemas  # noqa: F401 (a fixture)
from tests.unit.workflow_cases import plan_of, titled, write_uploads

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(("value", "source"), [
    ("hf://org/repo/loras/x.safetensors", HfSource("org/repo", "loras/x.safetensors", None)),
    (f"hf://org/repo@{COMMIT}/x.safetensors", HfSource("org/repo", "x.safetensors", COMMIT)),
    ("hf://org/repo/x.safetensors@v1.0", HfSource("org/repo", "x.safetensors", "v1.0")),
    ("https://civitai.com/api/download/models/12345", HttpsSource("https://civitai.com/api/download/models/12345")),
    ("s3://bucket/loras/a.safetensors", S3Source("bucket", "loras/a.safetensors")),
])
def test_sources_parse(value: str, source: object) -> None:
    assert parse_source(value) == source


def test_only_a_commit_is_pinned_and_queries_never_show() -> None:
    assert HfSource("o/r", "x.safetensors", COMMIT).pinned
    assert not HfSource("o/r", "x.safetensors", "main").pinned
    assert HttpsSource("https://h.example/a.safetensors?token=secret").describe() == "https://h.example/a.safetensors"


def wan(**lora: Any) -> dict[str, Any]:
    return {"workflow": "i2v", "image": "x", "prompt": "p", "loras": [lora]}


@pytest.mark.parametrize(("payload", "message"), [
    (wan(source="hf://org/repo/x.bin"), "loras.0.source: Value error, expected hf://ORG/REPO/PATH.safetensors"),
    (wan(source="hf://org/repo/../x.safetensors"), "loras.0.source: Value error, expected hf://"),
    (wan(source="file:///etc/passwd"), "loras.0.source: Value error, expected hf://"),
    (wan(source="s3://bucket"), "loras.0.source: Value error, expected s3://BUCKET/KEY"),
    (wan(source="hf://o/r/x.safetensors", strength=4.5), "loras.0.strength: Input should be less than or equal to 4"),
    (wan(source="hf://o/r/x.safetensors", target="middle"), "loras.0.target: Input should be 'high', 'low' or 'both'"),
    ({**wan(source="hf://o/r/x.safetensors"), "loras": [{"source": "hf://o/r/x.safetensors"}] * 5},
     "loras: List should have at most 4 items"),
    ({"workflow": "qwen_edit", "images": ["x"], "prompt": "p",
      "loras": [{"source": "hf://o/r/x.safetensors", "target": "high"}]},
     "loras.0.target: Value error, Qwen Image Edit has one model; target is for Wan's two experts"),
])
def test_bad_entries_are_refused_naming_the_entry(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as err:
        parse(payload)
    assert err.value.type == "validation"
    assert message.replace("Value error, ", "") in err.value.message


def test_the_schema_shows_loras_and_where_target_applies() -> None:
    from diffbox.workflows import NAMED

    for name in ("i2v", "svi", "qwen_edit"):
        schema = NAMED[name].request.model_json_schema()
        assert schema["properties"]["loras"]["maxItems"] == 4
        [entry] = [d for d in schema["$defs"] if "Lora" in d]
        target = schema["$defs"][entry]["properties"]["target"]
        assert (target.get("type") == "null") == (name == "qwen_edit"), target


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_lora_passes(tmp_path: Path) -> None:
    assert check_lora(write(tmp_path / "a", lora_bytes())) == 3


@pytest.mark.parametrize(("data", "words"), [
    (pickle_bytes(), "not a safetensors file"),
    (b"PK\x03\x04" + b"\0" * 100, "not a safetensors file"),
    (lora_bytes()[:-3], "truncated"),
    (lora_bytes() + b"\0", "header describes"),
    (struct.pack("<Q", 4) + b"[1] ", "not an object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
    (safetensors_bytes({"x.lora_up.weight": ("Q4", [1], b"\0")}), "unknown dtype 'Q4'"),
    (safetensors_bytes({"x.lora_up.weight": ("F32", [2], b"\0" * 4)}), "offsets do not match"),
    (safetensors_bytes({"model.diffusion_model.out.weight": ("F16", [2], b"\0" * 4)}), "looks like a model"),
    (safetensors_bytes({"x.lora_up.weight": ("F16", [1], b"\0\0"), "x.evil": ("F16", [1], b"\0\0")}),
     "tensor 'x.evil' is not one a LoRA loader reads"),
])
def test_anything_else_is_refused(tmp_path: Path, data: bytes, words: str) -> None:
    with pytest.raises(NotALora, match=words):
        check_lora(write(tmp_path / "f", data))


def _race(root: str, key: str, out: str, barrier: Any) -> None:
    """One process of the race: fetch `key` through the cache as the fetcher does."""
    cache = LoraCache(Path(root), 10**9)
    barrier.wait()
    with cache.source_lock(key):
        record = cache.lookup(key)
        if record is None:
            temp = cache.temp_path(key)
            data = lora_bytes(7)
            with temp.open("wb") as f:  # slowly, so the other process surely waits
                for i in range(0, len(data), 16):
                    f.write(data[i:i + 16])
                    time.sleep(0.005)
            sha = hashlib.sha256(data).hexdigest()
            cache.add(temp, sha, "test").release()
            cache.remember(key, sha)
            Path(out).write_text("downloaded")
        else:
            Path(out).write_text("hit")


def test_two_processes_racing_for_one_entry_download_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_race, args=(str(tmp_path), "hf:o/r@c/x.safetensors", str(o), barrier))
             for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(o.read_text() for o in outs) == ["downloaded", "hit"]
    cache_dir = tmp_path / "diffbox-cache"
    assert len(list(cache_dir.glob("*.safetensors"))) == 1
    assert list((cache_dir / ".tmp").iterdir()) == []


def _entry(cache: LoraCache, seed: int, age_s: float) -> str:
    data = lora_bytes(seed, features=64)  # about 2 KB each
    sha = hashlib.sha256(data).hexdigest()
    temp = cache.temp_path(sha)
    temp.write_bytes(data)
    cache.add(temp, sha, f"seed {seed}").release()
    then = time.time() - age_s
    os.utime(cache.path(sha), (then, then))
    return sha


def test_eviction_removes_least_recently_used_first_and_never_a_pinned_entry(tmp_path: Path) -> None:
    size = len(lora_bytes(0, features=64))
    cache = LoraCache(tmp_path, budget_bytes=2 * size)
    oldest, old, new = _entry(cache, 1, 300), _entry(cache, 2, 200), _entry(cache, 3, 100)
    pin = cache.pin(oldest)  # a running job uses the oldest: it is also the most recently used now
    assert pin is not None
    os.utime(cache.path(oldest), (time.time() - 400,) * 2)  # ...and old again, so only the pin protects it
    assert cache.evict() == [old]
    assert {p.name for p in tmp_path.joinpath("diffbox-cache").glob("*.safetensors")} == {
        f"{oldest}.safetensors", f"{new}.safetensors"}
    cache.budget_bytes = 0
    assert cache.evict() == [new]  # over budget, but the pinned entry stays
    assert cache.path(oldest).is_file()
    pin.release()
    assert cache.evict() == [oldest]
    assert not (tmp_path / "diffbox-cache" / f"{oldest}.json").exists()


def test_a_pin_on_an_evicted_entry_is_a_miss(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=0)
    sha = _entry(cache, 1, 10)
    cache.remember("k", sha)
    assert cache.lookup("k") == {"sha256": sha}
    assert cache.evict() == [sha]
    assert cache.lookup("k") is None and cache.pin(sha) is None
    assert list((tmp_path / "diffbox-cache" / ".index").iterdir()) == []  # its record went with it


def test_an_abandoned_part_goes_but_not_one_being_written(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=10**9)
    abandoned = cache.temp_path("dead")
    abandoned.write_bytes(b"x")
    live = cache.temp_path("live")
    live.write_bytes(b"x")
    with cache.source_lock("live"):
        cache.evict()
        assert live.exists() and not abandoned.exists()


def test_locks_are_flock_per_open_file(tmp_path: Path) -> None:
    # The cache relies on flock's semantics: two opens of one file conflict even in one process.
    cache = LoraCache(tmp_path, 0)
    sha = _entry(cache, 1, 0)
    pin = cache.pin(sha)
    assert pin is not None
    with (tmp_path / "diffbox-cache" / ".locks" / f"{sha}.lock").open("ab") as other, \
            pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    pin.release()


LORA_A = {"source": "hf://o/r/a.safetensors", "strength": 0.5, "target": "high"}
LORA_B = {"source": "https://civitai.com/api/download/models/1", "strength": -1.0}


def model_chain(graph: dict[str, Any], node: dict[str, Any]) -> list[str]:
    """Titles of the nodes a node's `model` input goes through, nearest first."""
    chain = []
    while "model" in node["inputs"]:
        node = graph[node["inputs"]["model"][0]]
        chain.append(node["_meta"]["title"])
    return chain


@pytest.mark.parametrize("preset", ["fast", "quality"])
def test_wan_loras_go_after_the_presets_own_on_their_experts(preset: str) -> None:
    plan = plan_of({"workflow": "i2v", "image": "x", "prompt": "p", "preset": preset, "loras": [LORA_A, LORA_B]})
    graph = plan.graph
    own = ["lora_high"] if preset == "fast" else []
    assert model_chain(graph, titled(graph, "shift_high")) == ["user_lora1_high", "user_lora0_high", *own, "unet_high"]
    low = model_chain(graph, titled(graph, "shift_low"))
    assert low[:2] == ["user_lora1_low", "lora_low" if own else "unet_low"]
    assert sorted(plan.lora_nodes.values()) == [0, 1, 1]
    loader = titled(graph, "user_lora0_high")["inputs"]
    assert loader["strength_model"] == 0.5 and loader["lora_name"] == placeholder(0)


def test_svi_loras_go_after_the_svi_loras() -> None:
    graph = plan_of({"workflow": "svi", "image": "x", "prompt": "p", "clips": 2, "loras": [LORA_B]}).graph
    assert model_chain(graph, titled(graph, "shift_low"))[:3] == ["user_lora0_low", "svi_lora_low", "lora_low"]


@pytest.mark.parametrize("model", ["2509", "2511"])
def test_qwen_loras_go_between_the_model_chain_and_the_sampler(model: str) -> None:
    graph = plan_of({"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "model": model,
                     "loras": [{"source": "hf://o/r/a.safetensors"}]}).graph
    chain = model_chain(graph, titled(graph, "sampler"))
    assert chain[0] == "user_lora0" and "lora" in chain[1:]


@pytest.mark.parametrize(("case", "payload"), [
    ("i2v", {"workflow": "i2v", "image": "x", "prompt": "p", "loras": [LORA_A, LORA_B]}),
    ("svi", {"workflow": "svi", "image": "x", "prompt": "p", "clips": 2, "preset": "quality", "loras": [LORA_B]}),
    ("qwen", {"workflow": "qwen_edit", "images": ["x"], "prompt": "p", "loras": [{"source": "s3://b/k"}] * 2}),
])
def test_graphs_with_loras_pass_comfyui_validation_once_bound(case: str, payload: dict[str, Any],
                                                              comfy_schemas: Schemas) -> None:  # noqa: F811
    plan = plan_of(payload)
    cache = LoraCache(comfy_schemas.paths.models / "loras", 10**9)
    names = []
    for index in range(len(payload["loras"])):
        sha = hashlib.sha256(lora_bytes(index)).hexdigest()
        cache.root.mkdir(parents=True, exist_ok=True)
        cache.path(sha).write_bytes(lora_bytes(index))
        names.append(cache.comfy_name(sha))
    bind(plan.graph, plan.lora_nodes, names)
    write_uploads(plan, Path(comfy_schemas.paths.input))
    valid, error, _, node_errors = validate_prompt(comfy_schemas, copy.deepcopy(plan.graph))
    assert (valid, error, node_errors) == (True, None, {})
    # ...and an unbound placeholder is a name ComfyUI refuses.
    plan = plan_of(payload)
    assert not validate_prompt(comfy_schemas, copy.deepcopy(plan.graph))[0]


def test_a_job_waiting_for_another_workers_download_can_give_up(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, 10**9)
    calls = []

    def give_up() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise JobError("cancelled", "job cancelled")

    with cache.source_lock("k"), pytest.raises(JobError), cache.source_lock("k", give_up):
        pass
    assert len(calls) == 3
    with cache.source_lock("k", give_up):  # free again
        pass


def test_settings_from_the_environment() -> None:
    from diffbox.config import Settings

    settings = Settings.from_env({"DIFFBOX_LORA_CACHE_GB": "1.5", "DIFFBOX_MAX_LORA_MB": "100",
                                  "HF_TOKEN": "hf_secret1", "CIVITAI_TOKEN": "civ_secret2",
                                  "HF_ENDPOINT": "https://hub.example"})
    assert (settings.lora_cache_gb, settings.max_lora_mb, settings.hf_endpoint) == (1.5, 100, "https://hub.example")
    assert (settings.hf_token, settings.civitai_token) == ("hf_secret1", "civ_secret2")
    assert "secret" not in repr(settings)
    defaults = Settings.from_env({})
    assert (defaults.lora_cache_gb, defaults.max_lora_mb, defaults.hf_token) == (50, 2048, None)
