"""URL-mode images in Redis, so any replica serves an image another one made (``--redis-url``).

Same interface as :class:`gateway.media.MediaStore`; Redis expires each entry after ``ttl_s``.
"""

from __future__ import annotations

import redis

from gateway.media import media_type_of, new_name


class RedisMediaStore:
    """Stores bytes under random names in Redis, each expiring ``ttl_s`` after it was put."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.r = client
        self.prefix = prefix.rstrip(":")
        self.ttl_s = ttl_s

    def put(self, data: bytes, media_type: str) -> str:
        """Store ``data``; return its name (the last URL segment)."""
        name = new_name(media_type)
        self.r.set(f"{self.prefix}:media:{name}", data, ex=max(1, self.ttl_s))
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        """The bytes and media type stored under ``name``, or ``None`` if unknown or expired."""
        media_type = media_type_of(name)
        if media_type is None:
            return None
        data = self.r.get(f"{self.prefix}:media:{name}")
        return None if data is None else (data, media_type)

    def sweep(self) -> int:
        """Nothing to do: Redis expires entries itself."""
        return 0
