"""Image sizes written as text: ``"1024x1024"`` (OpenAI, settings) or ``"1024*1024"`` (DashScope).

One parser for every place that reads one; each caller words its own error (field names and
examples differ by API) and the engine checks the bounds, naming the field.
"""

from __future__ import annotations

import math
import re

# ASCII digits, at most 5 per side: str.isdigit() takes "²", and int() refuses strings of
# 4,300+ digits (and accepts "+", "_" and other scripts' digits), so neither sees client text.
_DIM = re.compile(r"[0-9]{1,5}")


def parse_size(text: str, separators: str = "x", *, spaces: bool = False
               ) -> tuple[int, int] | None:
    """``"WxH"`` → ``(width, height)``, or ``None`` when ``text`` does not have that shape.

    Case is ignored and so is white space around the whole. ``separators`` lists the characters
    that may stand between width and height (``"*x"``: either); ``spaces`` allows white space
    around the separator too (``"1024 * 1024"``).
    """
    folded = text.strip().lower()
    first = separators[0]
    for other in separators[1:]:
        folded = folded.replace(other, first)
    width, found, height = folded.partition(first)
    if spaces:
        width, height = width.strip(), height.strip()
    if not found or not _DIM.fullmatch(width) or not _DIM.fullmatch(height):
        return None
    return int(width), int(height)


def fit_size(width: int, height: int, *, area: int, min_size: int, max_size: int
             ) -> tuple[int, int]:
    """An input image's ``width`` x ``height`` as an output size the engine accepts.

    Shrunk (aspect kept) to at most ``area`` pixels if larger, each side rounded down to a
    multiple of 8 and kept within ``min_size``..``max_size``. Edits (OpenAI) and img2img
    (ModelsLab) without an explicit size answer at their input's size this way.
    """
    scale = min(1.0, math.sqrt(area / (width * height)))
    return fit_side(width * scale, min_size, max_size), fit_side(height * scale, min_size,
                                                                 max_size)


def fit_side(value: float, min_size: int, max_size: int) -> int:
    """One side rounded down to a multiple of 8, within ``min_size``..``max_size``."""
    return min(max(int(value) // 8 * 8, min_size), max_size // 8 * 8)
