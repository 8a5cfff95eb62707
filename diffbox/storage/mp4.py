"""Width, height, frame count and rate of an MP4/MOV video, read from its `moov` box.

ComfyUI's video nodes write MP4. Reading these few fields from the container's index costs
kilobytes; PyAV (FFmpeg's libraries) costs about 17 MB resident once imported, which a worker
would then keep. Anything this does not understand is left to PyAV.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

ISO_BMFF_EXTENSIONS = {".mp4", ".mov", ".m4v"}
_MAX_MOOV = 64 * 1024 * 1024  # the index of hours of video; beyond it, not a file to trust


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in data[start:end]."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _read_moov(f: BinaryIO) -> bytes | None:
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        size, kind = struct.unpack(">I4s", head)
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", f.read(8))
            header = 16
        if kind == b"moov":
            if size == 0 or size - header > _MAX_MOOV:
                return None
            return f.read(size - header)
        if size < header:
            return None  # size 0 (to the end) before moov: no index to read
        f.seek(size - header, 1)


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def video_info(path: Path) -> dict[str, Any] | None:
    """The first video track's fields as `outputs.describe` reports them; None if unreadable."""
    try:
        with path.open("rb") as f:
            moov = _read_moov(f)
        if moov is None:
            return None
        for kind, start, end in _boxes(moov):
            if kind != b"trak":
                continue
            mdia = _child(moov, start, end, b"mdia")
            if mdia is None:
                continue
            hdlr, mdhd = _child(moov, *mdia, b"hdlr"), _child(moov, *mdia, b"mdhd")
            if hdlr is None or mdhd is None or moov[hdlr[0] + 8:hdlr[0] + 12] != b"vide":
                continue
            minf = _child(moov, *mdia, b"minf")
            stbl = _child(moov, *minf, b"stbl") if minf else None
            stsd = _child(moov, *stbl, b"stsd") if stbl else None
            stsz = _child(moov, *stbl, b"stsz") if stbl else None
            stts = _child(moov, *stbl, b"stts") if stbl else None
            if stsd is None or stsz is None or stts is None:
                return None
            (timescale,) = struct.unpack_from(">I", moov, mdhd[0] + (20 if moov[mdhd[0]] == 1 else 12))
            # The samples' own durations (as FFmpeg's average rate counts them), not the track's,
            # which may run on past the last frame.
            (entries,) = struct.unpack_from(">I", moov, stts[0] + 4)
            duration = sum(count * delta for count, delta in struct.iter_unpack(
                ">II", moov[stts[0] + 8:stts[0] + 8 + 8 * entries]))
            # The first sample entry: 8 bytes of stsd header, then the entry's own 8-byte box
            # header, 8 reserved/reference bytes and 16 predefined ones before width and height.
            width, height = struct.unpack_from(">HH", moov, stsd[0] + 8 + 32)
            (frames,) = struct.unpack_from(">I", moov, stsz[0] + 8)
            info: dict[str, Any] = {"width": width, "height": height, "frames": frames}
            if frames and duration and timescale:
                fps = frames * timescale / duration
                info["fps"] = round(fps, 3)
                info["duration_s"] = round(frames / fps, 3)
            return info
    except (OSError, struct.error, TypeError):
        return None
    return None
