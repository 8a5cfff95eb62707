from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from diffbox.errors import JobError
from diffbox.inputs.media import decode_image


def _encoded(fmt: str = "PNG", size: tuple[int, int] = (10, 6)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_bare_base64_and_data_uri_decode_to_the_same_image() -> None:
    bare = decode_image(_encoded(), "image", 1_000_000)
    uri = decode_image("data:image/png;base64," + _encoded(), "image", 1_000_000)
    assert bare == uri
    assert (bare.width, bare.height, bare.extension) == (10, 6, "png")


def test_jpeg_is_recognised() -> None:
    assert decode_image(_encoded("JPEG"), "image", 1_000_000).extension == "jpg"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("data:text/plain;base64,aGVsbG8=", "data URI must have an image/* type"),
        ("data:image/png,notbase64", "malformed data URI"),
        ("@@@@", "not valid base64"),
        (base64.b64encode(b"GIF89a-but-truncated").decode(), "not a readable image"),
        ("", "expected an image"),
        ("https://example.com/a.png", "URL inputs are not available"),
    ],
)
def test_bad_values_are_refused_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(JobError) as err:
        decode_image(value, "images[2].image", 1_000_000)
    assert err.value.type == "validation"
    assert err.value.message.startswith("images[2].image: ")
    assert message in err.value.message


def test_size_is_checked_before_decoding() -> None:
    with pytest.raises(JobError, match=r"larger than the 0\.0001 MB limit"):
        decode_image("A" * 1000, "image", 100)


def test_decompression_bombs_are_refused_from_the_header() -> None:
    # A PNG whose header claims 20000x20000 pixels: refused before any pixel is decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    with pytest.raises(JobError, match="has more than the 64 MP limit"):
        decode_image(base64.b64encode(buf.getvalue()).decode(), "image", 10_000_000)
