"""Input images: fetch or decode, bound the size, prove they are images.

An image value is a `data:` URI, bare base64, an `https://` URL or an `s3://bucket/key` in
the configured store. Sizes are checked before anything is decoded, and every image is
opened with Pillow (with its decompression-bomb guard) so a bad input is refused before
ComfyUI or the GPU sees it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ..errors import JobError, validation

# 64 MP: far above any model's input, far below what would exhaust the worker's memory.
MAX_PIXELS = 64_000_000
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
# Bounded: on 40 MB of base64 an unbounded scheme would scan (and backtrack over) all of it.
_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]{0,31})://", re.I)
_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}

Fetcher = Callable[[str, str, int], bytes]


@dataclass(frozen=True)
class InputImage:
    data: bytes
    extension: str
    width: int
    height: int


def decode_image(
    value: str,
    field: str,
    max_bytes: int,
    fetch: Fetcher | None = None,
) -> InputImage:
    """Turn one request image value into verified image bytes, or a validation error."""
    if not isinstance(value, str) or not value:
        raise validation(f"{field}: expected an image (data URI, base64, https:// or s3:// URL)")
    if url := _URL.match(value):
        # Any other scheme (file://, ftp://, gopher://...) could reach what https:// may not.
        if url["scheme"].lower() not in ("https", "http", "s3"):
            raise validation(f"{field}: {url['scheme']}:// URLs are not accepted (https:// or s3://)")
        if fetch is None:
            raise validation(f"{field}: URL inputs are not available on this worker")
        data = fetch(value, field, max_bytes)
    else:
        data = _decode_base64(value, field, max_bytes)
    return verify_image(data, field)


def _decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    payload = value
    if value.startswith("data:"):
        match = _DATA_URI.match(value, 0, 256)  # the header only: never scan the payload
        if not match:
            raise validation(f"{field}: malformed data URI (expected data:image/...;base64,...)")
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise validation(f"{field}: data URI must have an image/* type, got {mime or 'none'!r}")
        payload = value[match.end() :]
    # base64 is 4 characters per 3 bytes: refuse by length before allocating the decoded copy.
    if len(payload) * 3 // 4 > max_bytes:
        raise too_large(field, max_bytes)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise validation(f"{field}: not valid base64") from None


def too_large(field: str, max_bytes: int) -> JobError:
    return validation(f"{field}: image is larger than the {max_bytes / 1e6:g} MB limit (DIFFBOX_MAX_INPUT_MB)")


def verify_image(data: bytes, field: str) -> InputImage:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise validation(
                    f"{field}: image is {width}x{height}, it has more than the {MAX_PIXELS // 1_000_000} MP limit"
                )
            img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise validation(f"{field}: image has more than the {MAX_PIXELS // 1_000_000} MP limit") from None
    except (OSError, SyntaxError, ValueError):
        raise validation(f"{field}: not a readable image (PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    if fmt not in _FORMATS:
        raise validation(f"{field}: unsupported image format {fmt or 'unknown'}")
    return InputImage(data=data, extension=_FORMATS[fmt], width=width, height=height)
