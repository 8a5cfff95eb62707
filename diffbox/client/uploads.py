"""Local files named in a request, turned into what the worker reads: inline data URIs, or
objects in the S3 store that DIFFBOX_S3_* describe (the variables the worker reads too).

Only the image fields are looked at (`image`, `end_image`, `images`, and a raw graph's
`images[].image`), and only values that name an existing file: a URL, a data URI or base64
goes as it is.
"""

from __future__ import annotations

import base64
import mimetypes
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from ..config import S3Settings, Settings
from ..errors import JobError
from .errors import UploadError

UploadMode = Literal["auto", "inline", "s3", "url"]
UPLOAD_MODES: tuple[UploadMode, ...] = ("auto", "inline", "s3", "url")
IMAGE_FIELDS = ("image", "end_image", "images")
# No path is this long; a longer value is data, and is not looked up on disk.
MAX_PATH = 4096

Uploader = Callable[[Path], str]


def data_uri(path: Path) -> str:
    """The file inline. A type the worker would not take as image/* goes as bare base64,
    which it decodes and identifies with Pillow all the same."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = mimetypes.guess_type(path.name)[0] or ""
    return f"data:{mime};base64,{encoded}" if mime.startswith("image/") else encoded


class S3Uploader:
    """Puts each file at `{prefix}/inputs/{random}/{name}` in the bucket; the request then
    carries its `s3://` URI (`presign` False: the worker must be configured with the same
    bucket) or a presigned https URL (`presign` True: any worker that can reach the store)."""

    def __init__(self, settings: S3Settings, presign: bool) -> None:
        from ..storage.s3 import S3Store

        self.store = S3Store(settings)
        self.prefix = "/".join(part for part in (settings.prefix, "inputs") if part)
        self.presign = presign

    def __call__(self, path: Path) -> str:
        key = f"{self.prefix}/{uuid.uuid4().hex}/{path.name}"
        try:
            stored = self.store.put(path, key, mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        except JobError as err:
            raise UploadError(err.message) from None
        return str(stored["url"] if self.presign else stored["s3_uri"])


def uploader(mode: UploadMode = "auto", env: Mapping[str, str] | None = None) -> Uploader:
    """`auto`: to S3 when DIFFBOX_S3_BUCKET (or BUCKET_ENDPOINT_URL) is set, else inline;
    `inline`; `s3` (s3:// URIs); `url` (presigned URLs)."""
    if mode == "inline":
        return data_uri
    s3 = Settings.from_env(env).s3
    if s3 is None:
        if mode == "auto":
            return data_uri
        raise UploadError(f"upload mode {mode!r} needs an S3 store: set DIFFBOX_S3_BUCKET (and "
                          "DIFFBOX_S3_ENDPOINT_URL, AWS credentials) as for the worker")
    return S3Uploader(s3, presign=mode == "url")


def attach_local_files(payload: dict[str, Any], upload: Uploader) -> dict[str, Any]:
    """A copy of `payload` whose image fields carry the local files they name."""
    out = dict(payload)
    for field in IMAGE_FIELDS:
        value = out.get(field)
        if isinstance(value, str):
            out[field] = _attached(value, upload)
        elif isinstance(value, list):
            out[field] = [_attached_item(item, upload) for item in value]
    return out


def is_local_file(value: str) -> bool:
    if len(value) > MAX_PATH or value.startswith(("data:", "http://", "https://", "s3://")):
        return False
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _attached(value: str, upload: Uploader) -> str:
    return upload(Path(value).expanduser()) if is_local_file(value) else value


def _attached_item(item: Any, upload: Uploader) -> Any:
    if isinstance(item, str):
        return _attached(item, upload)
    if isinstance(item, dict) and isinstance(item.get("image"), str):
        return {**item, "image": _attached(item["image"], upload)}
    return item
