"""What an image sent again saves: the same `qwen_edit` (or `i2v`) request three times on one
worker, the second with only a new seed, the third with a new image, on the real ComfyUI of
`make comfyui-env` on the CPU with the typed workflows' stand-in weights (full-size text encoders
and VAE, tiny diffusion models).

    uv run python bench/repeated_inputs.py                  # qwen_edit 2509, 256x256
    uv run python bench/repeated_inputs.py --workflow i2v   # i2v fast, 256x256, 5 frames

Inputs are named by their content (diffbox/backends/comfyui_inputs.py), so the second job's
image is the same file to ComfyUI and its cache answers what depends only on it and on the
prompt: printed per job, its total, ComfyUI's execution and the nodes that ran, slowest first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from diffbox.config import Settings  # noqa: E402
from diffbox.service import Service  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.e2e.test_typed_workflows_real import QWEN, WAN, picture  # noqa: E402
from tests.realcomfy import installed, start_real_comfyui  # noqa: E402


class NodeTimes(logging.Handler):
    """The worker's DEBUG `prompt node times`: the nodes a prompt ran (none that its cache answered)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.prompts: list[list[dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "prompt node times":
            self.prompts.append(record.__dict__["fields"]["nodes"])


def request(workflow: str, image: int, seed: int) -> dict[str, Any]:
    base = QWEN if workflow == "qwen_edit" else {**WAN, "preset": "fast"}
    images = {"images": [picture(image, (256, 256))]} if workflow == "qwen_edit" else {"image": picture(image)}
    return {**base, **images, "seed": seed, "output": {"store": "inline"}}


async def run(args: argparse.Namespace) -> None:
    times = NodeTimes()
    logger = logging.getLogger("diffbox.comfyui")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(times)
    with tempfile.TemporaryDirectory() as work, \
            start_real_comfyui(installed(), Path(work) / "comfyui", free_port()) as comfy:
        service = Service(Settings(comfyui_url=comfy.url, comfyui_dir=comfy.base_dir, work_dir=Path(work) / "w",
                                   models_dir=comfy.base_dir / "models", workflows=[args.workflow]))
        for label, image, seed in (("first", 1, 1), ("same image, new seed", 1, 2), ("new image", 2, 3)):
            result = await service.run(label.replace(" ", "-").replace(",", ""), request(args.workflow, image, seed))
            if "error" in result:
                raise SystemExit(f"{label}: {result['error']}")
            timings = result["timings"]
            ran = sorted(times.prompts[-1], key=lambda node: -node["s"])
            print(f"{label:22} total {timings['total_s']:7.1f} s  ComfyUI {timings.get('comfyui_exec_s', 0):7.1f} s  "
                  f"nodes run {len(ran):2}: " + ", ".join(f"{n['class']} {n['s']:.1f}" for n in ran if n["s"] >= 0.1))
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", choices=["qwen_edit", "i2v"], default="qwen_edit")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
