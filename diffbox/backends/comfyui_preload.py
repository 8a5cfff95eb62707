"""ComfyUI's start in two halves, so that a CPU memory snapshot can hold the first.

Run by ComfyUI's own interpreter in its folder, in place of `main.py`:

    python comfyui_preload.py main.py ARGS...

First half, with no GPU visible: the packages ComfyUI imports that need none (torch itself,
torchvision, transformers...: about half of its start), after what ComfyUI's `main.py` does
before it lets torch load (its arguments parsed, the CUDA allocator chosen). Then it prints
`READY` and waits for one line on stdin: the environment to run in (this container's, after
the restore). Second half: `main.py ARGS...` in this process, which imports the rest of
ComfyUI and its nodes and initialises CUDA, now with the container's GPU.

A package that asks for CUDA while the GPU is hidden would remember "no GPU" for the life of
the process, so any such query fails the preload (exit code 3): the worker then starts
ComfyUI the ordinary way. Standard library only: this runs in ComfyUI's environment.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

READY = "diffbox-preload: ready"
# What ComfyUI 0.3.x imports at start that initialises nothing on a GPU (checked by the guard
# below); the ones not installed are skipped.
MODULES = ("torch", "torchvision", "torchaudio", "numpy", "PIL.Image", "einops", "safetensors.torch", "scipy",
           "kornia", "av", "tqdm", "aiohttp", "yaml", "transformers", "spandrel", "psutil")
CUDA_QUERIED = 3


def _comfyui_prologue() -> dict[str, str]:
    """What ComfyUI's main.py does before torch may load (it warns if torch came first): parse
    its arguments and choose the CUDA allocator, which torch reads once, when it loads. Returns
    the environment variables that set."""
    if not Path("cuda_malloc.py").is_file():
        return {}  # not ComfyUI's own main.py: nothing to do before torch
    before = dict(os.environ)
    import comfy.options  # type: ignore[import-not-found]

    comfy.options.enable_args_parsing()
    import cuda_malloc  # type: ignore[import-not-found]  # noqa: F401

    return {k: v for k, v in os.environ.items() if before.get(k) != v}


def _preload() -> list[str]:
    """Import MODULES; returns those that asked CUDA for its devices while doing so."""
    queried: list[str] = []
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError:
        return queried
    count = torch._C._cuda_getDeviceCount
    importing = [""]

    def guard() -> int:
        queried.append(importing[0])
        return 0

    torch._C._cuda_getDeviceCount = guard
    try:
        for name in MODULES:
            importing[0] = name
            try:
                importlib.import_module(name)
            except ImportError:
                continue
    finally:
        torch._C._cuda_getDeviceCount = count
    if torch.cuda.is_initialized():
        queried.append("torch.cuda")
    return queried


def main(argv: list[str]) -> Any:
    sys.argv = argv  # main.py and its argument parser read them from here
    # As `python main.py` would have it: ComfyUI's folder first, not this script's (whose
    # neighbours, vllm.py among them, would shadow packages).
    sys.path[0] = os.getcwd()
    own = _comfyui_prologue()
    queried = _preload()
    if queried:
        print(f"diffbox-preload: CUDA queried while the GPU is hidden, by {', '.join(queried)}", flush=True)
        return CUDA_QUERIED
    print(READY, flush=True)
    line = sys.stdin.readline()
    if not line:
        return 0  # the worker went away before the restore
    os.environ.clear()
    os.environ.update({**json.loads(line), **own})
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
