"""mp4.video_info reads what PyAV reads from an MP4, without PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image

from diffbox.storage import mp4, outputs


def _write(path: Path, frames: int, fps: int, size: tuple[int, int]) -> None:
    with av.open(str(path), mode="w", options={"movflags": "use_metadata_tags"}) as out:
        stream = out.add_stream("h264", rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", size, (i * 7 % 256, 80, 160))
            for packet in stream.encode(av.VideoFrame.from_image(image).reformat(format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize(("frames", "fps", "size"), [(8, 8, (64, 48)), (33, 16, (96, 64)), (1, 24, (32, 32))])
def test_same_fields_as_pyav(tmp_path: Path, frames: int, fps: int, size: tuple[int, int]) -> None:
    path = tmp_path / "clip.mp4"
    _write(path, frames, fps, size)
    info = mp4.video_info(path)
    assert info is not None and info["frames"] == frames and (info["width"], info["height"]) == size
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert info["fps"] == round(float(stream.average_rate), 3)
    assert outputs._video_info(path) == info


def test_not_an_mp4_is_left_to_pyav(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x08free" + b"not a video" * 10)
    assert mp4.video_info(path) is None
    assert outputs._video_info(path) == {}
