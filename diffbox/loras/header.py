"""The safetensors check a LoRA passes before ComfyUI may load it.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data offsets; optional `__metadata__` of strings) and the tensors' bytes. Only
this format is accepted: it holds data, never code, unlike the pickles of .ckpt/.pt files.
The header must be well-formed, describe the whole file (a truncated download fails here),
use dtypes torch knows, and name tensors the way ComfyUI's LoRA loader (comfy/lora.py and
comfy/weight_adapter/) reads them.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

# safetensors' own bound on the header.
MAX_HEADER = 100 * 1024 * 1024
# dtype -> bytes per element (safetensors' names; F8 variants are one byte).
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
          "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Tensor name endings ComfyUI's LoRA loader maps: LoRA (kohya, diffusers, PEFT, mochi,
# transformers, Qwen's `.default`), LoCon mid, alpha, DoRA, LoHa, LoKr, GLoRA, OFT/BOFT, and
# plain weight diffs (`.diff`, `.diff_b`, `.set_weight`, `.w_norm`, `.b_norm`).
LORA_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight", ".lora_B", ".lora_A",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_B.default.weight",
    ".lora_A.default.weight", ".reshape_weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale",
    ".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm",
)
# Names that only qualify what a LoRA tensor above does.
AUXILIARY_SUFFIXES = (".alpha", ".dora_scale")


class NotALora(ValueError):
    """Why a file is not a LoRA this worker passes to ComfyUI (the message says it to a caller)."""


def check_lora(path: Path) -> int:
    """Check the file at `path`; returns how many tensors it holds, or raises NotALora."""
    header, length, size = _header(path)
    end = _check_tensors(header)
    if 8 + length + end != size:
        raise NotALora(f"the file is {size} bytes but its header describes {8 + length + end} (truncated?)")
    _check_names(list(header))
    return len(header)


def tensor_names(path: Path) -> list[str]:
    """The names of the tensors in a file that passed `check_lora`."""
    return list(_header(path)[0])


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The header's tensor entries (without `__metadata__`), its length and the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NotALora("not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > MAX_HEADER or 8 + length > size:
            raise NotALora("not a safetensors file (pickled checkpoints, .ckpt/.pt/.bin, are refused)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotALora("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotALora("malformed safetensors header (not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotALora("malformed safetensors header (__metadata__ must map names to strings)")
    return header, length, size


def _check_tensors(header: dict[str, Any]) -> int:
    """Check each tensor's entry; returns where the last one's bytes end."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise NotALora(f"malformed safetensors header at tensor {name[:100]!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise NotALora(f"tensor {name[:100]!r} has an unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise NotALora(f"tensor {name[:100]!r} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise NotALora(f"tensor {name[:100]!r} has malformed data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype]:
            raise NotALora(f"tensor {name[:100]!r}: its offsets do not match its shape and dtype")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    position = 0
    for start, stop in spans:
        # The format has no gaps and no overlaps.
        if start != position:
            raise NotALora("malformed safetensors header (tensor data overlaps or leaves gaps)")
        position = stop
    return position


def _check_names(names: list[str]) -> None:
    if not any(n.endswith(LORA_SUFFIXES) for n in names):
        raise NotALora("no tensor is named as a LoRA's (lora_up/lora_down, lora_A/lora_B, diff, LoHa, LoKr...): "
                       "this looks like a model, not a LoRA")
    for name in names:
        if not name.endswith(LORA_SUFFIXES + AUXILIARY_SUFFIXES):
            raise NotALora(f"tensor {name[:100]!r} is not one a LoRA loader reads")
