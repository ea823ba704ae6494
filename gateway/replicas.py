"""Where shared state lives: local files (one process) or Redis (replicas; docs/replicas.md).

One place decides, so the app factory asks once: the task store, the media store for URL-mode
images, the usage ledger and the quota limiter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from auth.quota import QuotaLimiter
from auth.usage import UsageLedger
from gateway.jobs import job_store
from gateway.media import MediaStore
from gateway.settings import Settings


@dataclass
class Stores:
    """The shared-state services of one server."""

    tasks: Any
    media: Any
    ledger: Any
    quotas: QuotaLimiter


def usage_ledger(settings: Settings) -> Any:
    """The usage ledger these settings point at: the SQLite file, or Redis with ``--redis-url``."""
    if not settings.redis_url:
        return UsageLedger(settings.usage_path)
    import redis

    from auth.usage_redis import RedisUsageLedger

    return RedisUsageLedger(redis.Redis.from_url(settings.redis_url), settings.redis_prefix)


def build_stores(settings: Settings) -> Stores:
    """SQLite and files under the data dir, or Redis when ``--redis-url`` is set."""
    if not settings.redis_url:
        return Stores(
            tasks=job_store(settings.data_path, settings.results_dir or ""),
            media=MediaStore(settings.data_path / "media", settings.url_ttl_s),
            ledger=usage_ledger(settings),
            quotas=QuotaLimiter(settings.ratelimit_storage),
        )
    import redis

    from gateway.media_redis import RedisMediaStore
    from inference.tasks_redis import RedisTaskStore

    prefix = settings.redis_prefix
    client = redis.Redis.from_url(settings.redis_url)
    storage = settings.ratelimit_storage
    if storage == "memory://":
        storage = settings.redis_url
    return Stores(
        tasks=RedisTaskStore(settings.redis_url, prefix),
        media=RedisMediaStore(client, prefix, settings.url_ttl_s),
        ledger=usage_ledger(settings),
        quotas=QuotaLimiter(storage, key_prefix=f"{prefix}:limits"),
    )
