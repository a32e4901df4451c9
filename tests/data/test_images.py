"""load_image: every accepted source form decodes to the same RGB pixels; every failure names the sample."""

import io

import numpy as np
import pytest
from PIL import Image

from moca_fast.data.images import load_image


@pytest.fixture
def png(make_image):
    image = make_image(30, 20)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


def test_every_source_form_gives_the_same_rgb_pixels(png, tmp_path):
    image, data = png
    path = tmp_path / "a.png"
    path.write_bytes(data)
    sources = [
        data,
        bytearray(data),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        path,
        image,
        image.convert("RGBA"),
    ]
    for source in sources:
        loaded = load_image(source, "s0")
        assert loaded.mode == "RGB" and loaded.size == (20, 30)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_grayscale_is_converted_to_rgb():
    loaded = load_image(Image.new("L", (5, 7), 200), "s0")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (200, 200, 200)


@pytest.mark.parametrize("corrupt", [b"not an image", b""])
def test_corrupt_bytes_name_the_sample(corrupt):
    with pytest.raises(ValueError, match="sample doc-7: cannot decode image bytes"):
        load_image(corrupt, "doc-7")


def test_truncated_png_is_an_error_not_a_partial_image(png):
    _, data = png
    with pytest.raises(ValueError, match="sample doc-8: cannot decode"):
        load_image(data[: len(data) // 2], "doc-8")


def test_missing_file_names_the_sample_and_the_path(tmp_path):
    missing = tmp_path / "nowhere.png"
    for source in (missing, str(missing), {"bytes": None, "path": str(missing)}):
        with pytest.raises(ValueError, match=f"sample row-3: image file not found: {missing}"):
            load_image(source, "row-3")


@pytest.mark.parametrize("source", [None, 42, {"bytes": None, "path": None}])
def test_unsupported_sources_name_the_sample(source):
    with pytest.raises(ValueError, match="sample x1: unsupported image source"):
        load_image(source, "x1")
