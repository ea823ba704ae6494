"""ControlNet: which ones are served, loading them, and turning a unit's image into a control map.

Served ControlNets come from the ``--controlnet`` setting (``kind=path`` pairs, one diffusers
``ControlNetModel`` folder per kind); tiny-sdxl brings a tiny ``canny`` one. Each runs through
``StableDiffusionXLControlNet*Pipeline`` built from the loaded base's components (no second copy
of the UNet, VAE or text encoders); several units in one request use a ``MultiControlNetModel``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference.images import decode_rgb, to_luma

logger = logging.getLogger(__name__)

# A1111's default Canny thresholds (sd-webui-controlnet's "canny" preprocessor).
CANNY_LOW = 100
CANNY_HIGH = 200

# Kinds whose control map the server can compute from a plain photo (``preprocess`` True).
PREPROCESSORS = ("canny",)


class ControlNetNotFound(RuntimeError):
    """A configured ControlNet folder is missing or unreadable; the message says which."""


def parse_controlnets(text: str) -> tuple[tuple[str, str], ...]:
    """``"canny=/models/cn-canny,depth=/models/cn-depth"`` as ``(kind, path)`` pairs.

    Raises ``ValueError`` naming the bad entry; kinds are lower-cased and must be unique.
    """
    pairs: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, path = part.partition("=")
        kind, path = kind.strip().lower(), path.strip()
        if not sep or not kind or not path:
            raise ValueError(f"--controlnet entries are kind=path, got {part!r}")
        if any(k == kind for k, _ in pairs):
            raise ValueError(f"--controlnet names {kind!r} twice")
        pairs.append((kind, path))
    return tuple(pairs)


def load_controlnets(
    pairs: tuple[tuple[str, str], ...], *, device: str, dtype: str, tiny_root: Path | None = None
) -> dict[str, Any]:
    """Load every configured ControlNet onto ``device``; tiny-sdxl adds its own ``canny``."""
    import torch
    from diffusers import ControlNetModel

    wanted = dict(pairs)
    if tiny_root is not None:
        wanted.setdefault("canny", str(tiny_root / "controlnet-canny"))
    models: dict[str, Any] = {}
    for kind, where in wanted.items():
        path = Path(where).expanduser()
        if not (path / "config.json").is_file():
            raise ControlNetNotFound(
                f"ControlNet {kind!r}: {path} is not a diffusers ControlNetModel folder "
                "(no config.json)")
        try:
            model = ControlNetModel.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                    local_files_only=True)
        except Exception as exc:
            raise ControlNetNotFound(f"ControlNet {kind!r} at {path} could not be loaded: {exc}") from exc
        models[kind] = model.to(device)
        logger.info("ControlNet %s loaded from %s", kind, path)
    return models


def canny(image: Any, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Any:
    """Canny edges of a PIL image as a white-on-black RGB PIL image (OpenCV)."""
    import cv2
    from PIL import Image

    gray = np.asarray(to_luma(image))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1), mode="RGB")


def control_map(data: bytes, kind: str, *, preprocess: bool, width: int, height: int) -> np.ndarray:
    """A unit's image as the control map the ControlNet reads: (3, H, W) floats in [0, 1].

    Raises :class:`InvalidRequest` (field ``control``) when the image cannot be decoded.
    """
    image = decode_rgb(data, width, height, field="control", what="control image")
    if preprocess and kind == "canny":
        image = canny(image)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
