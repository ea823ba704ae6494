"""Short-lived image hosting for URL-mode responses.

Images are written under ``data_dir/media`` with an unguessable name and served until they
expire (``--url-ttl-s``, default one hour, as OpenAI's URLs). Any dialect may use it.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
MEDIA_TYPES = {v: k for k, v in EXTENSIONS.items()}
_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.(png|jpg|webp)$")


def new_name(media_type: str) -> str:
    """A fresh unguessable media name with the extension of ``media_type``."""
    return f"{secrets.token_urlsafe(24)}.{EXTENSIONS.get(media_type, 'png')}"


def media_type_of(name: str) -> str | None:
    """The media type a valid media name stands for, or ``None`` for a name we never issue."""
    return MEDIA_TYPES[name.rsplit(".", 1)[1]] if _NAME.match(name) else None


class MediaStore:
    """Stores bytes under random names; an entry expires ``ttl_s`` seconds after it was written."""

    def __init__(self, root: Path, ttl_s: int) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, media_type: str) -> str:
        """Store ``data``; return its name (the last URL segment)."""
        name = new_name(media_type)
        tmp = self.root / f".{name}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not keep half an image
            raise
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        """The bytes and media type stored under ``name``, or ``None`` if unknown or expired."""
        media_type = media_type_of(name)
        if media_type is None:
            return None
        path = self.root / name
        try:
            if time.time() - path.stat().st_mtime > self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes(), media_type
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        """Delete expired entries; return how many went."""
        cutoff = time.time() - self.ttl_s
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
