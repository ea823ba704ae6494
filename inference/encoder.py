"""Image encoding in a worker pool, off the executor thread.

PNG at zlib level 6 costs ~0.4 s for a 1024² image on one core; left on the executor it would
stall the next batch. Pillow releases the GIL while compressing, so threads overlap well.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from inference.request import GeneratedImage, OutputFormat

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
        image.save(buf, format="PNG", compress_level=png_level)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=max(1, min(compression, 95)))
    else:
        if compression >= 100:
            image.save(buf, format="WEBP", lossless=True, quality=60, method=1)
        else:
            image.save(buf, format="WEBP", quality=compression, method=4)
    return buf.getvalue()


class EncoderPool:
    """A small thread pool that turns arrays into encoded (and optionally base64) images."""

    def __init__(self, workers: int = 2, *, png_level: int = 1) -> None:
        self.png_level = png_level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagegate-encode")

    @property
    def workers(self) -> int:
        """Threads in the pool."""
        return self._pool._max_workers

    def submit_many(self, items: list[EncodeItem]) -> Future[list[tuple[GeneratedImage, float]]]:
        """Encode ``items`` one after another on one pool thread.

        One task per chunk rather than per image: each hand-off to a thread costs about as much
        as encoding a small image, so the caller splits a batch into ``workers`` chunks.
        """
        return self._pool.submit(lambda: [self._encode(*item) for item in items])

    def _encode(
        self, array: np.ndarray, fmt: OutputFormat, compression: int, seed: int, want_base64: bool
    ) -> tuple[GeneratedImage, float]:
        started = time.perf_counter()
        image = to_pil(array)
        data = encode_image(image, fmt, compression=compression, png_level=self.png_level)
        b64 = base64.b64encode(data).decode("ascii") if want_base64 else None
        out = GeneratedImage(
            data=data, media_type=MEDIA_TYPES[fmt], seed=seed,
            width=image.width, height=image.height, b64=b64,
        )
        return out, time.perf_counter() - started

    def shutdown(self) -> None:
        """Finish queued encodes and stop the workers."""
        self._pool.shutdown(wait=True)
