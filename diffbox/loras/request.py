"""A request's `loras` entries and the sources they name.

`hf://ORG/REPO/PATH.safetensors` (optionally `@REVISION` after the repo or at the end),
`https://...` (CivitAI's download URLs included) or `s3://BUCKET/KEY` in the configured bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from ..schemas import Strict

MAX_LORAS = 4
Target = Literal["high", "low", "both"]
# A repo id as the Hub allows it; a revision is a branch, tag or commit (no "..", no spaces).
_HF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev1>[\w.-]+))?/(?P<path>[^@]+?\.safetensors)"
                 r"(?:@(?P<rev2>[\w.-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HfSource:
    repo: str
    path: str
    revision: str | None

    @property
    def pinned(self) -> bool:
        """A commit id names the same bytes forever: a cached copy needs no network call."""
        return self.revision is not None and _COMMIT.match(self.revision) is not None

    def describe(self) -> str:
        return f"hf://{self.repo}{'@' + self.revision if self.revision else ''}/{self.path}"


@dataclass(frozen=True)
class HttpsSource:
    url: str

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    def describe(self) -> str:
        # The query can be a credential (a presigned URL, a token): results and records omit it.
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class S3Source:
    bucket: str
    key: str

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Source = HfSource | HttpsSource | S3Source


def parse_source(value: str) -> Source:
    """The source a `source` string names; ValueError says what is wrong with it."""
    if value.startswith("hf://"):
        match = _HF.match(value)
        if match is None or ".." in match["path"].split("/"):
            raise ValueError("expected hf://ORG/REPO/PATH.safetensors, optionally with @REVISION "
                             "after the repo or at the end")
        if match["rev1"] and match["rev2"]:
            raise ValueError("give the revision once")
        return HfSource(match["repo"], match["path"], match["rev1"] or match["rev2"])
    if value.startswith("s3://"):
        bucket, _, key = value.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ValueError("expected s3://BUCKET/KEY")
        return S3Source(bucket, key)
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme in ("https", "http"):  # http only where DIFFBOX_ALLOW_PRIVATE_URLS says; the URL guard decides
        return HttpsSource(value)
    raise ValueError("expected hf://ORG/REPO/PATH.safetensors, an https:// URL or s3://BUCKET/KEY")


class LoraEntry(Strict):
    source: str = Field(min_length=6, max_length=2000, description=(
        "hf://ORG/REPO/PATH.safetensors (optionally @REVISION; a commit id is never re-checked), "
        "an https:// URL (CivitAI download URLs included) or s3://BUCKET/KEY in this endpoint's bucket. "
        "Only safetensors LoRAs are accepted."))
    strength: float = Field(default=1.0, ge=-4.0, le=4.0, description="The LoRA's model strength.")
    target: Target | None = Field(default=None, description=(
        "Wan only: which expert takes the LoRA, high (noise), low or both (default). Absent for Qwen."))
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description=(
        "Optional: the file's sha256 (CivitAI and the Hub show it). A cached copy is then used without any "
        "request to the source, and a download must match it."))

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parse_source(value)
        return value

    @property
    def parsed(self) -> Source:
        return parse_source(self.source)


def loras_field() -> Any:
    return Field(default_factory=list, max_length=MAX_LORAS, description=(
        f"Up to {MAX_LORAS} LoRAs, fetched and cached by the worker, applied after the preset's own."))
