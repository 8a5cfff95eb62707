"""Telling a caller which LoRA tensors ComfyUI ignored: the log lines a prompt added, and the
verdict remembered where ComfyUI reuses a loader's output instead of running it again."""

from __future__ import annotations

from pathlib import Path

from diffbox.loras import unmatched
from tests.lorafiles import lora_bytes

LAYER = "diffusion_model.blocks.0.self_attn.q"
GRAPH = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan_high.safetensors"}},
    "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan_low.safetensors"}},
    "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "a.safetensors"}},
    "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["3", 0], "lora_name": "b.safetensors"}},
    "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": "b.safetensors"}},
}


def test_only_lines_after_the_mark_count() -> None:
    before = [("t1", "loading\n"), ("t2", "lora key not loaded: old.lora_up.weight\n")]
    after = [*before, ("t3", "lora key not loaded: x.lora_up.weight\nlora key not loaded: x.alpha\n"),
             ("t4", "Prompt executed in 1.0 seconds\n")]
    mark = unmatched.last_entry(before)
    assert unmatched.not_loaded_since(after, mark) == {"x.lora_up.weight", "x.alpha"}
    # A log that rolled past the mark: every entry it still holds counts.
    assert unmatched.not_loaded_since(after[2:], ("t0", "gone")) == {"x.lora_up.weight", "x.alpha"}
    assert unmatched.not_loaded_since(None, mark) is None  # no log to read: no verdict


def test_chain_root_follows_the_model_inputs() -> None:
    assert unmatched.chain_root(GRAPH, "4") == "wan_high.safetensors"
    assert unmatched.chain_root(GRAPH, "5") == "wan_low.safetensors"


def test_verdicts_per_file_and_model_survive_a_cached_loader(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(lora_bytes(1, LAYER))
    b.write_bytes(lora_bytes(2, "lora_unet_input_blocks_1"))
    files = {"a.safetensors": a, "b.safetensors": b}
    loaders = {"3": "a.safetensors", "4": "b.safetensors"}
    verdicts = unmatched.Verdicts()
    ignored = {f"lora_unet_input_blocks_1.{s}" for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    first = verdicts.judge(GRAPH, loaders, files, executed={"3", "4"}, not_loaded=ignored)
    assert first == {"a.safetensors": (0, 3), "b.safetensors": (3, 3)}
    # ComfyUI reused both loaders' outputs and logged nothing: the verdict stands.
    assert verdicts.judge(GRAPH, loaders, files, executed=set(), not_loaded=set()) == first
    # The same file on another model was never judged: nothing is claimed for it.
    assert verdicts.judge(GRAPH, {"5": "b.safetensors"}, files, executed=set(), not_loaded=set()) == {}
    message = unmatched.warning(1, "hf://x/y/b.safetensors", 3, 3)
    assert message.startswith("loras[1] (hf://x/y/b.safetensors): ComfyUI found no layer of the model for any of "
                              "its 3 tensors")
    assert "2 of its 3 tensors" in unmatched.warning(0, "s", 2, 3)
