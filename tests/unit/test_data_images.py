"""Tests for mmtrain.data.images.load_image."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.data.images import ImageLoadError, load_image


def _noisy_png(path: Path, size: int = 64) -> Path:
    """A PNG with random pixels, so that it does not compress to a few bytes."""
    rng = random.Random(0)
    image = Image.new("RGB", (size, size))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size * size)])
    image.save(path)
    return path


def test_loads_rgb_and_decodes_pixels(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert str(caught.value) == f"image file not found: {path}"
    assert isinstance(caught.value, OSError)


def test_random_bytes_are_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert str(caught.value).startswith("not a readable image (")
    assert str(caught.value).endswith(f": {path}")


def test_truncated_png_fails_on_decode(tmp_path: Path) -> None:
    whole = _noisy_png(tmp_path / "whole.png")
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as lazy:  # the header alone still looks fine
        assert lazy.size == (64, 64)
    with pytest.raises(ImageLoadError) as caught:
        load_image(cut)
    assert str(caught.value).startswith("truncated or corrupt image data (")
    assert str(caught.value).endswith(f": {cut}")


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (255, 0, 0)
    red, green, blue = loaded.getpixel((2, 0))
    assert abs(red - 127) <= 1 and abs(green - 127) <= 1 and blue == 255


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes_are_composited_on_white(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.png"
    if mode == "LA":
        image = Image.new("LA", (2, 1))
        image.putdata([(0, 0), (0, 255)])
    else:
        image = Image.new("P", (2, 1))
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        image.putdata([0, 1])
        image.info["transparency"] = 0
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == ((0, 0, 0) if mode == "LA" else (10, 20, 30))


def test_svg_is_reported_as_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "drawing.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>')
    with pytest.raises(ImageLoadError, match=r"unsupported image format \(SVG\)"):
        load_image(path)
    disguised = tmp_path / "drawing.png"
    disguised.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    with pytest.raises(ImageLoadError, match=r"unsupported image format \(SVG\)"):
        load_image(disguised)
