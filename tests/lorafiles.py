"""Tiny LoRA files for tests, written in the safetensors format by hand (the format is an
8-byte little-endian header length, a JSON header, then the tensors' bytes)."""

from __future__ import annotations

import json
import pickle
import random
import struct

# Tokens the LoRA tests give the worker; no log may ever hold them (loghygiene.py).
HF_TOKEN = "hf_diffboxTestTokenNeverLogged"
CIVITAI_TOKEN = "civitai-test-token-never-logged"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]],
                      metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


def lora_bytes(seed: int = 0, prefix: str = "diffusion_model.blocks.0.self_attn.q", rank: int = 2,
               features: int = 4, scale: float = 0.01) -> bytes:
    """A random rank-`rank` LoRA (values within +-`scale`) for one `features`x`features` linear
    layer (F32), with the names ComfyUI maps to the model's `{prefix}.weight`."""
    rng = random.Random(seed)

    def f32(count: int) -> bytes:
        return struct.pack(f"<{count}f", *(rng.uniform(-scale, scale) for _ in range(count)))

    return safetensors_bytes({
        f"{prefix}.lora_down.weight": ("F32", [rank, features], f32(rank * features)),
        f"{prefix}.lora_up.weight": ("F32", [features, rank], f32(rank * features)),
        f"{prefix}.alpha": ("F32", [], struct.pack("<f", float(rank))),
    }, {"seed": str(seed)})


def pickle_bytes() -> bytes:
    return pickle.dumps({"state_dict": [1, 2, 3]})
