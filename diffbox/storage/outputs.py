"""Describe an output file: kind, content type, size, checksum, and media dimensions."""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from typing import Any

from PIL import Image

from . import mp4

_VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
_AUDIO_EXTENSIONS = {".flac", ".mp3", ".wav", ".ogg", ".opus", ".m4a"}
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("video/webm", ".webm")
mimetypes.add_type("audio/flac", ".flac")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path, animated: bool = False) -> dict[str, Any]:
    """The result fields of one file, read from the file itself."""
    suffix = path.suffix.lower()
    info: dict[str, Any] = {
        "filename": path.name,
        "content_type": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    if suffix in _VIDEO_EXTENSIONS or (animated and suffix in (".webp", ".png")):
        info["kind"] = "video"
        info.update(_video_info(path) if suffix in _VIDEO_EXTENSIONS else _image_info(path))
    elif suffix in _IMAGE_EXTENSIONS:
        info["kind"] = "image"
        info.update(_image_info(path))
    elif suffix in _AUDIO_EXTENSIONS:
        info["kind"] = "audio"
    else:
        info["kind"] = "file"
    return info


def _image_info(path: Path) -> dict[str, Any]:
    try:
        with Image.open(path) as img:
            info: dict[str, Any] = {"width": img.width, "height": img.height}
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                info["frames"] = frames
            return info
    except OSError:
        return {}


def _video_info(path: Path) -> dict[str, Any]:
    if path.suffix.lower() in mp4.ISO_BMFF_EXTENSIONS and (indexed := mp4.video_info(path)) is not None:
        return indexed
    import av  # here: about 17 MB resident, kept once imported; MP4s (ComfyUI's) do without

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for _ in container.demux(stream) if _.size)
            fps = float(stream.average_rate) if stream.average_rate else None
            info: dict[str, Any] = {"width": stream.width, "height": stream.height, "frames": frames}
            if fps:
                info["fps"] = round(fps, 3)
                info["duration_s"] = round(frames / fps, 3)
            return info
    except (av.FFmpegError, IndexError, OSError):
        return {}
