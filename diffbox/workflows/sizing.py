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


# The sizes ComfyUI's FluxKontextImageScale picks from (`PREFERED_KONTEXT_RESOLUTIONS` in
# comfy_extras/nodes_flux.py): about 1 MP each, multiples of 16, portrait to landscape.
KONTEXT_SIZES = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def kontext_size(aspect: float) -> tuple[int, int]:
    """The size FluxKontextImageScale scales an image of `aspect` (width / height) to: the
    listed size nearest in aspect (the first of a tie, as its `min` over the list keeps it)."""
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_SIZES)
    return width, height
