"""Output sizes: limits a request's width and height must meet, and the defaults drawn from
the input image's aspect ratio at a workflow's preferred pixel count."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SizeRule:
    multiple: int
    low: int
    high: int
    area: int  # the pixel count a default size aims at

    def check(self, value: int | None) -> int | None:
        if value is not None and (value % self.multiple or not self.low <= value <= self.high):
            raise ValueError(f"must be a multiple of {self.multiple} between {self.low} and {self.high}, got {value}")
        return value

    def snap(self, value: float) -> int:
        return min(max(round(value / self.multiple) * self.multiple, self.low), self.high)

    def resolve(self, width: int | None, height: int | None, aspect: float) -> tuple[int, int]:
        """The size to render: as requested, with what is missing taken from `aspect`
        (width / height of the input image)."""
        if width is not None and height is not None:
            return width, height
        if width is not None:
            return width, self.snap(width / aspect)
        if height is not None:
            return self.snap(height * aspect), height
        return self.snap(math.sqrt(self.area * aspect)), self.snap(math.sqrt(self.area / aspect))
