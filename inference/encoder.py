"""Image encoding in a worker pool, off the executor thread.

PNG through Pillow costs 150-200 ms for a 1024² image even at zlib level 1, a quarter of a
compiled SDXL step loop on a fast GPU. When the ``fpng`` package is installed (a default
dependency), 8-bit RGB PNGs are written by fpng instead: about 5 ms for 1024², lossless, valid
PNG, slightly larger files. JPEG (libjpeg-turbo) and WebP stay with Pillow, which releases the
GIL, so pool threads encode those in parallel. fpng (0.1.0) holds it: a batch's PNGs are
written one after another (docs/benchmarks.md §4.15). base64 goes through ``pybase64`` (SIMD)
when installed, a default dependency: 0.5 ms for a 1024² PNG's 3 MB against 5.9 ms for the
standard library's, which holds the GIL throughout (a thread beside pybase64 kept 87% of its
speed).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from inference.request import GeneratedImage, OutputFormat

logger = logging.getLogger(__name__)

try:  # optional fast path; the Pillow encoder is always there
    import fpng as _fpng
except ImportError:  # pragma: no cover - fpng is a default dependency
    _fpng = None

try:  # optional fast path; the standard library's base64 is always there
    from pybase64 import b64encode_as_string as _b64_string
except ImportError:  # pragma: no cover - pybase64 is a default dependency
    _b64_string = None

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# (array, format, compression, seed, want_base64)
EncodeItem = tuple[np.ndarray, OutputFormat, int, int, bool]


def to_pil(array: np.ndarray) -> Image.Image:
    """An 8-bit (H, W, 3) array as an RGB image."""
    return Image.fromarray(array, mode="RGB") if array.dtype == np.uint8 else Image.fromarray(
        (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8))


def encode_image(
    image: Image.Image, fmt: OutputFormat, *, compression: int = 100, png_level: int = 1
) -> bytes:
    """Encode ``image``; ``compression`` is the 0-100 quality of JPEG/WebP (100 = best)."""
    buf = io.BytesIO()
    if fmt == "png":
        if _fpng is not None and png_level > 0 and image.mode == "RGB":
            return encode_png_fast(np.asarray(image))
        image.save(buf, format="PNG", compress_level=png_level)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=max(1, min(compression, 95)))
    else:
        if compression >= 100:
            image.save(buf, format="WEBP", lossless=True, quality=60, method=1)
        else:
            image.save(buf, format="WEBP", quality=compression, method=4)
    return buf.getvalue()


def encode_png_fast(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG through fpng (call only when ``fpng_available()``)."""
    assert _fpng is not None
    return bytes(_fpng.from_ndarray(np.ascontiguousarray(array)))


def b64_string(data: bytes) -> str:
    """``data`` in standard base64, as text (pybase64 when installed, else the stdlib's)."""
    if _b64_string is not None:
        return _b64_string(data)
    return base64.b64encode(data).decode("ascii")


def fpng_available() -> bool:
    """True when the fast PNG writer is installed."""
    return _fpng is not None


class EncoderPool:
    """A small thread pool that turns arrays into encoded (and optionally base64) images."""

    def __init__(self, workers: int = 0, *, png_level: int = 1) -> None:
        self.png_level = png_level
        # 0: one thread per core, at most 8 (a batch holds at most a few tens of images).
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagegate-encode")

    @property
    def workers(self) -> int:
        """Threads in the pool."""
        return self._pool._max_workers

    def submit_many(self, items: list[EncodeItem]) -> Future[list[tuple[GeneratedImage, float]]]:
        """Encode ``items`` one after another on one pool thread (usually one item)."""
        return self._pool.submit(lambda: [self._encode(*item) for item in items])

    def _encode(
        self, array: np.ndarray, fmt: OutputFormat, compression: int, seed: int, want_base64: bool
    ) -> tuple[GeneratedImage, float]:
        started = time.perf_counter()
        height, width = array.shape[:2]
        if (fmt == "png" and self.png_level > 0 and _fpng is not None
                and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3):
            data = encode_png_fast(array)  # straight from the array: no PIL copy
        else:
            data = encode_image(to_pil(array), fmt, compression=compression,
                                png_level=self.png_level)
        b64 = b64_string(data) if want_base64 else None
        out = GeneratedImage(
            data=data, media_type=MEDIA_TYPES[fmt], seed=seed, width=width, height=height, b64=b64,
        )
        return out, time.perf_counter() - started

    def shutdown(self) -> None:
        """Finish queued encodes and stop the workers."""
        self._pool.shutdown(wait=True)
