"""The models folder's layout, and ComfyUI's `extra_model_paths.yaml` that points at it.

One layout for the builder that fills a models folder (image build, network volume) and the
worker that starts ComfyUI on it: `{models_dir}/{ComfyUI folder}/{file name}`, and vLLM
snapshots under `{models_dir}/llm/{repo id}`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

CONFIG_NAME = "extra_model_paths.yaml"
CHAT_FOLDER = "llm"
# ComfyUI's model folders that loaders look in (folder_paths.py). Listing them all lets raw
# graphs find files a user put in any of them, not only the folders our manifest fills.
COMFY_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
    "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
)


def model_folders(models_dir: Path, extra: Iterable[str] = ()) -> list[str]:
    """ComfyUI's folders, then `extra`, then any other folder already under `models_dir`."""
    found = sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    names: dict[str, None] = {}
    for name in (*COMFY_FOLDERS, *extra, *found):
        if name != CHAT_FOLDER and not name.startswith("."):
            names[name] = None
    return list(names)


def render_extra_model_paths(models_dir: Path, folders: Iterable[str]) -> str:
    # is_default puts these folders first in ComfyUI's search (and makes them where its own
    # downloads go), ahead of the empty models/ inside the ComfyUI install.
    group: dict[str, object] = {"base_path": str(models_dir.absolute()), "is_default": True}
    group.update({name: f"{name}/" for name in folders})
    return yaml.safe_dump({"diffbox": group}, sort_keys=False)


def write_extra_model_paths(models_dir: Path, out: Path, extra: Iterable[str] = ()) -> Path:
    """Write ComfyUI's extra_model_paths.yaml for `models_dir` to `out`; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_extra_model_paths(models_dir, model_folders(models_dir, extra)))
    # Atomic, so a ComfyUI restarting at the same moment never reads half a file.
    tmp.replace(out)
    return out


def chat_model_dir(models_dir: Path, repo: str) -> Path:
    """Where a vLLM model snapshot lives; vLLM takes this path as `--model`."""
    return models_dir / CHAT_FOLDER / repo
