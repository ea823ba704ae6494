"""Decoding the images requests carry (init images, control images) on the executor thread."""

from __future__ import annotations

import io
from typing import Any

from inference.errors import InvalidRequest


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
