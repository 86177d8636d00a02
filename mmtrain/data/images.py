"""Loading images from disk as fully decoded RGB pictures.

Decoding happens here, eagerly, so that missing, corrupt and truncated files
are caught when a sample is loaded rather than deep inside a transform.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mmtrain.errors import UserError

_TRANSPARENT_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SVG_SUFFIXES = frozenset({".svg", ".svgz"})
_WHITE = (255, 255, 255, 255)


class ImageLoadError(UserError, OSError):
    """An image file could not be loaded; ``reason`` says why and names the file.

    The user's to fix (their file), hence a UserError; still an OSError for callers that catch those.
    Usually turned into a BadSampleError naming the manifest line (training) or a report line (check).
    """

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:
        return (type(self), (self.reason, self.path))


def _looks_like_svg(path: Path) -> bool:
    """Whether a file Pillow could not identify is an SVG drawing."""
    if path.suffix.lower() in _SVG_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(1024).lower()
    except OSError:
        return False
    return b"<svg" in head


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts to RGB, compositing any transparency onto a white background."""
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Loads an image as a fully decoded RGB picture.

    Transparent images are composited onto white, and the EXIF orientation tag
    is applied so the picture is upright as a viewer would show it.

    Args:
        path: The image file.

    Returns:
        An RGB image whose pixels are already decoded.

    Raises:
        ImageLoadError: The file is missing, not an image Pillow can read
            (SVG included), or its pixel data is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ImageLoadError(f"not a readable image (it is a directory): {path}", path)
        raise ImageLoadError(f"image file not found: {path}", path)
    try:
        image = Image.open(path)
    except UnidentifiedImageError as error:
        if _looks_like_svg(path):
            raise ImageLoadError(f"unsupported image format (SVG): {path}", path) from None
        raise ImageLoadError(f"not a readable image ({error}): {path}", path) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"not a readable image ({error}): {path}", path) from None
    with image:
        try:
            image.load()
        # Decoders report damaged data through many exception types
        # (OSError, SyntaxError, zlib.error, struct.error, EOFError, ...).
        except Exception as error:  # noqa: BLE001
            raise ImageLoadError(f"truncated or corrupt image data ({error}): {path}", path) from None
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001
            # Broken EXIF metadata does not make the pixels unusable.
            upright = image
        return _to_rgb(upright)
