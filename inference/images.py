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
        with Image.open(io.BytesIO(data)):
            pass
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{field} is not a readable image: {exc}", field=field) from exc


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
