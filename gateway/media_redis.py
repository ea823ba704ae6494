"""URL-mode images in Redis, so any replica serves an image another one made (``--redis-url``).

Same interface as :class:`gateway.media.MediaStore`; Redis expires each entry after ``ttl_s``.
"""

from __future__ import annotations

import re
import secrets

import redis

from gateway.media import EXTENSIONS, MEDIA_TYPES

_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.(png|jpg|webp)$")


class RedisMediaStore:
    """Stores bytes under random names in Redis, each expiring ``ttl_s`` after it was put."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.r = client
        self.prefix = prefix.rstrip(":")
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str) -> str:
        """Store ``data``; return its name (the last URL segment)."""
        name = f"{secrets.token_urlsafe(24)}.{EXTENSIONS.get(media_type, 'png')}"
        self.r.set(f"{self.prefix}:media:{name}", data, ex=max(1, self.ttl_s))
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        """The bytes and media type stored under ``name``, or ``None`` if unknown or expired."""
        if not _NAME.match(name):
            return None
        data = self.r.get(f"{self.prefix}:media:{name}")
        if data is None:
            return None
        return data, MEDIA_TYPES[name.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        """Nothing to do: Redis expires entries itself."""
        return 0
