"""ComfyUI's output folder full, on both legs: a ComfyUI of this leg's kind writes its outputs to
a small tmpfs that a filler file has all but filled. The job fails with ComfyUI's own error,
naming the node that could not write; once there is room again the next job is correct; and
nothing of the failed job is left in ComfyUI's folders or the worker's, nor a thread.
"""

from __future__ import annotations

import base64
import io
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from diffbox.config import Settings
from diffbox.service import Service
from tests.conftest import comfy_folder_files
from tests.jobkit import Baseline, invert_job, is_inversion_of, png_b64, wait_until

TMPFS_BYTES = 4 * 1024 * 1024
# Noise compresses to nothing less than itself: its inverted PNG needs about as many bytes.
NOISE_SIZE = (384, 384)


def noise_png() -> str:
    rng = random.Random(7)
    pixels = bytes(rng.getrandbits(8) for _ in range(NOISE_SIZE[0] * NOISE_SIZE[1] * 3))
    image = Image.frombytes("RGB", NOISE_SIZE, pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def small_output(own_comfyui: tuple[Settings, Path]) -> Iterator[Path]:
    """The ComfyUI's output folder as a 4 MB tmpfs (mounting needs root, as CI runs)."""
    _, base = own_comfyui
    output = base / "output"
    output.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(output)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield output
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)


async def test_a_full_output_folder_fails_the_job_naming_the_node_and_the_next_one_runs(
    own_comfyui: tuple[Settings, Path], small_output: Path
) -> None:
    settings, base = own_comfyui
    before = Baseline.take()
    service = Service(settings)
    service.start()
    image = noise_png()
    try:
        warm = await service.run("warm", invert_job(png_b64((9, 9, 9))))
        assert "error" not in warm, warm
        filler = small_output / "filler.bin"
        free = shutil.disk_usage(small_output).free
        filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # 64 KB left: less than the noise's PNG
        files_before = comfy_folder_files(base)

        result = await service.run("full", invert_job(image))
        error = result["error"]
        assert error["type"] == "backend", error
        assert "SaveImage" in error["message"] and "No space left on device" in error["message"], error

        filler.unlink()
        after = await service.run("room-again", invert_job(image))
        assert "error" not in after, after
        [output] = after["images"]
        assert is_inversion_of(output["data"], image)
        # Every job's files are gone again (a half-written PNG of the failed one included).
        wait_until(lambda: comfy_folder_files(base) <= files_before, 10,
                   f"the jobs' files removed: {comfy_folder_files(base)}")
        assert not any((settings.work_dir / job).exists() for job in ("full", "room-again"))
    finally:
        service.stop()
    before.wait_ended()



def test_the_noise_image_needs_more_room_than_is_left() -> None:
    """The check above can fail only if the job's PNG does not fit in what the filler leaves."""
    assert len(base64.b64decode(noise_png())) > 256 * 1024
