"""Opening images: one rule for every source (dataset folders, `datasets` rows, `run --image`).

1. Decode the whole file (a truncated file fails here, not in the middle of an evaluation); Pillow's
   decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 MP: over twice that is refused) stays.
2. Apply the EXIF orientation, as `datasets.Image` does (`ImageOps.exif_transpose`).
3. Scale 16-bit grey (modes I;16*, and I, which holds 16-bit PNGs in older Pillows) from 0..65535 to
   0..255; Pillow's own conversion would clip it to white.
4. Convert to RGB.

Failures raise `ImageLoadError` (a ValueError) naming the image and the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_MAX = 65535


class ImageLoadError(ValueError):
    """An image that cannot be read (missing, not an image, truncated, too many pixels): "cannot read
    image NAME (REASON)", with `name` and `reason` as attributes."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name} ({reason})")
        self.name, self.reason = name, reason


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` with its EXIF orientation applied, 16-bit grey scaled to 8 bits, as RGB (steps 2-4)."""
    if image.getexif().get(ExifTags.Base.Orientation) is not None:  # the test `datasets.Image` makes
        image = ImageOps.exif_transpose(image)  # a copy, without the orientation tag
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255 / _SIXTEEN_BIT_MAX)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))  # (H, W), mode L
    return image.convert("RGB")


def open_image(source, name: str | None = None) -> Image.Image:
    """The image in `source` (a path, bytes or a binary file object), decoded and as RGB.

    Args:
        source: a file path, the file's bytes, or an open binary file.
        name: how errors name the image (default: the path, or "bytes").

    Raises:
        ImageLoadError: the file is missing, not an image, truncated, or over the pixel limit.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    name = name or (str(source) if isinstance(source, (str, Path)) else "bytes")
    try:
        with Image.open(source) as image:
            image.load()  # 1. decode everything now
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, _bomb(err)) from None
    except (OSError, ValueError, SyntaxError) as err:  # missing, a folder, not an image, truncated, bad header
        raise ImageLoadError(name, _reason(err)) from None


def check_image(source, name: str | None = None) -> tuple[int, int]:
    """Decode the image in `source` and forget it; its (height, width) as `open_image` gives it
    (EXIF orientation applied). ImageLoadError as in `open_image`."""
    with open_image(source, name) as image:
        return image.height, image.width


def progress_bar(items, progress: bool | None, total: int | None = None):
    """`items`, with a progress bar "checking images" on stderr (progress None: on a terminal only)."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="checking images", unit="image", leave=False,
                disable=None if progress is None else not progress)


def _reason(err: Exception) -> str:
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _bomb(err: Exception) -> str:
    """Pillow's first clause ("Image size (N pixels) exceeds limit of M pixels") and what to do."""
    return f"{str(err).split(',')[0]}: Pillow's decompression-bomb limit; scale the image down"
