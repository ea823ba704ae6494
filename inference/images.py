"""The images requests carry (init images, masks, control images).

A cheap header check at admission, and decoding on the executor thread.
"""

from __future__ import annotations

import io
from typing import Any

from inference.errors import InvalidRequest


def check_image_header(data: bytes, field: str) -> None:
    """Refuse bytes that are not an image Pillow can open (header only; decoding comes later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{field} is not a readable image: {exc}", field=field) from exc
    if not convertible_to_rgb(mode):
        raise InvalidRequest(f"{field} is an image in mode {mode}, which cannot be converted to "
                             "RGB; send an RGB, RGBA or grayscale image", field=field)


def convertible_to_rgb(mode: str) -> bool:
    """Whether Pillow can turn an image of ``mode`` into RGB (a few exotic modes it cannot).

    Checked on a 1×1 image of that mode: cheap, and without decoding the upload.
    """
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).convert("RGB")
    except (ValueError, OSError, KeyError):
        return False
    return True


def to_luma(image: Any) -> Any:
    """``image`` as 8-bit grayscale (mode L).

    Through RGB for the modes Pillow cannot map to L directly (LAB, for one).
    """
    try:
        return image.convert("L")
    except ValueError:
        return image.convert("RGB").convert("L")


def decode_rgb(data: bytes, width: int, height: int, *, field: str, what: str) -> Any:
    """``data`` decoded as an RGB PIL image of ``width`` × ``height``.

    Raises :class:`InvalidRequest` naming ``field`` (``what`` words the message) when the bytes
    are not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{what} could not be decoded: {exc}", field=field) from exc
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image
