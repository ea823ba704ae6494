"""The task store in Redis, shared by replicas (``--redis-url``).

Same protocol as :class:`inference.tasks.SqliteTaskStore`. Keys, all under one prefix:

- ``P:job:<id>``: the job (msgspec JSON); Redis deletes it an hour after ``expires_at``.
- ``P:img:<id>:<i>``: result image bytes, same expiry as the job (images shared in Redis, so
  any replica serves any job's result; no shared volume needed).
- ``P:queued`` (sorted set by creation time), ``P:running`` (set), ``P:expiry`` (sorted set by
  ``expires_at``), ``P:scope:<dialect>:<scope>`` (set) and ``P:scopet:<dialect>:<scope>``
  (sorted set by creation time, for task lists), ``P:webhooks`` (set: final jobs whose webhook
  is pending, the outbox): indexes; stale members are dropped when read.
- ``P:webhook_heads`` (hash): each pending delivery's :class:`~inference.tasks.WebhookHead`,
  written with its ``P:webhooks`` entry, so a look for deliveries to resume reads no job.
- ``P:heads:<dialect>:<scope>`` (hash): each of the scope's jobs' :class:`StatusHead`, written
  by the same transaction as the job, so counts (RunPod ``/health``), status-filtered task lists
  and purges read no finished job's document (a payload can be a 20 MB data URL).
- ``P:owner:<id>``: the job's dialect and scope, so the sweep can drop the scope's entries of a
  job whose key is already gone (evicted, or not swept within its grace); it outlives the job
  key by another grace, and expires by itself where a server that knows no owners unlinks it.
- ``P:worker:<id>``: a replica's heartbeat, with a TTL. A running job whose worker's heartbeat
  is gone is reclaimed by another replica (:func:`inference.tasks.reclaim_jobs`).

Every status change is a compare-and-set (``WATCH``/``MULTI``), so two replicas never both
start one queued job, and a late write from a dead replica cannot overwrite a re-claimed job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import redis

from inference.tasks import (
    ACTIVE,
    FINISHED,
    INTERRUPTED_REASON,
    MAX_REQUEUES,
    QUEUED,
    RUNNING,
    WEBHOOK_PENDING,
    WEBHOOK_SCAN,
    Job,
    StoredImage,
    WebhookHead,
    apply_changes,
    check_list_args,
    client_status,
    matches,
    reclaim_jobs,
)

T = TypeVar("T")

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
# Job keys outlive expires_at a little so the sweeper still sees what to clean up.
GRACE_S = 3600
# Jobs read per round trip when a filtered task list walks its window.
LIST_CHUNK = 500
# Drop an index entry unless the job (read again, inside Redis) has that value now: the job may
# have come back to it since it was read (re-queued, re-claimed), and an unconditional ZREM/SREM
# would then drop a live entry and stall the job. KEYS: index, job; ARGV: member, value, "z"
# for a sorted set or "s" for a set, the job's field (status, webhook_state).
_UNINDEX_UNLESS = """
local doc = redis.call('GET', KEYS[2])
if doc and cjson.decode(doc)[ARGV[4]] == ARGV[2] then return 0 end
if ARGV[3] == 'z' then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('SREM', KEYS[1], ARGV[1])
"""


class StatusHead(msgspec.Struct, frozen=True, kw_only=True):
    """What counting and filtering a scope's jobs need of one job: not its document."""

    status: str
    started: bool = False
    retried: bool = False
    expires_at: float = 0.0
    # The job's creation time, which a retry renews: what tells a head a retry passed it by.
    created_at: float = 0.0

    @classmethod
    def of(cls, job: Job) -> StatusHead:
        """``job``'s head."""
        return cls(status=job.status, started=job.started_at is not None,
                   retried=job.retries > 0, expires_at=job.expires_at,
                   created_at=job.created_at)

    def client_status(self) -> str:
        """As :func:`~inference.tasks.client_status` says of the job."""
        return QUEUED if self.status == RUNNING and not self.started else self.status


class RedisTaskStore:
    """Jobs and their images in Redis under ``prefix``."""

    shared = True

    def __init__(self, url: str, prefix: str = "imagegate") -> None:
        self.url = url
        self.prefix = prefix.rstrip(":")
        self._r: redis.Redis | None = None
        self._unindex: Any = None  # the registered index-drop script, once open

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (and check that Redis answers)."""
        self._r = redis.Redis.from_url(self.url)
        self._r.ping()
        # EVALSHA with the script cached in Redis (sent again only if Redis lost it).
        self._unindex = self._r.register_script(_UNINDEX_UNLESS)

    def close(self) -> None:
        """Disconnect."""
        if self._r is not None:
            self._r.close()
            self._r = None

    @property
    def r(self) -> redis.Redis:
        """The connection."""
        if self._r is None:
            raise RuntimeError("task store is not open")
        return self._r

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _scope_key(self, dialect: str, scope: str) -> str:
        return self._k("scope", dialect, scope)

    def _time_key(self, dialect: str, scope: str) -> str:
        # The same jobs as the scope set, scored by creation time: task lists read one page.
        return self._k("scopet", dialect, scope)

    def _heads_key(self, dialect: str, scope: str) -> str:
        return self._k("heads", dialect, scope)

    def _put_head(self, pipe: Any, job: Job) -> None:
        pipe.hset(self._heads_key(job.dialect, job.scope), job.id,
                  msgspec.json.encode(StatusHead.of(job)))

    # -- jobs ------------------------------------------------------------------------------

    def create(self, job: Job) -> None:
        """Store a new job and index it."""
        expire_ms = int((job.expires_at + GRACE_S) * 1000)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._k("job", job.id), msgspec.json.encode(job), pxat=expire_ms)
        self._index(pipe, job, None)
        pipe.sadd(self._scope_key(job.dialect, job.scope), job.id)
        self._put_head(pipe, job)
        pipe.zadd(self._time_key(job.dialect, job.scope), {job.id: job.created_at})
        pipe.zadd(self._k("expiry"), {job.id: job.expires_at})
        pipe.set(self._k("owner", job.id), msgspec.json.encode((job.dialect, job.scope)),
                 pxat=expire_ms + GRACE_S * 1000)
        self._index_webhook(pipe, job, None)
        pipe.execute()

    def _index_webhook(self, pipe: Any, job: Job, old: Job | None) -> None:
        if job.webhook_state == WEBHOOK_PENDING:
            pipe.sadd(self._k("webhooks"), job.id)
            pipe.hset(self._k("webhook_heads"), job.id, msgspec.json.encode(WebhookHead.of(job)))
        elif old is not None and old.webhook_state == WEBHOOK_PENDING:
            self._unindex_webhook(pipe, job.id)

    def _unindex_webhook(self, pipe: Any, job_id: str) -> None:
        pipe.srem(self._k("webhooks"), job_id)
        pipe.hdel(self._k("webhook_heads"), job_id)

    def _index(self, pipe: Any, job: Job, old_status: str | None) -> None:
        if old_status == job.status:
            return
        if old_status == QUEUED:
            pipe.zrem(self._k("queued"), job.id)
        elif old_status == RUNNING:
            pipe.srem(self._k("running"), job.id)
        if job.status == QUEUED:
            pipe.zadd(self._k("queued"), {job.id: job.created_at})
        elif job.status == RUNNING:
            pipe.sadd(self._k("running"), job.id)

    def _load(self, raw: bytes | None) -> Job | None:
        return None if raw is None else msgspec.json.decode(raw, type=Job)

    def get(self, job_id: str, now: float | None = None) -> Job | None:
        """The job, or ``None`` when unknown or expired."""
        job = self._load(self.r.get(self._k("job", job_id)))
        if job is None or job.expires_at <= (time.time() if now is None else now):
            return None
        return job

    def update(self, job_id: str, expect: Sequence[str] | None = None, *,
               owner: str | None = None, where: Mapping[str, Any] | None = None,
               **changes: Any) -> Job | None:
        """Compare-and-set: apply ``changes`` if status, worker and ``where``'s fields match."""

        def write(pipe: Any, job: Job) -> Job:
            new = apply_changes(job, changes)
            pipe.set(self._k("job", job_id), msgspec.json.encode(new), keepttl=True)
            self._index(pipe, new, job.status)
            self._index_webhook(pipe, new, job)
            self._put_head(pipe, new)
            if new.created_at != job.created_at:  # a retry is listed as new
                pipe.zadd(self._time_key(new.dialect, new.scope), {new.id: new.created_at})
            return new

        return self._compare_and_set(job_id, lambda job: matches(job, expect, owner, where),
                                     write)

    def _compare_and_set(self, job_id: str, check: Callable[[Job], bool],
                         write: Callable[[Any, Job], T]) -> T | None:
        """Apply ``write(pipe, job)``'s queued writes if ``check(job)`` holds, atomically.

        ``WATCH``/``MULTI``, retried when the job changed meanwhile. Returns ``write``'s result,
        or ``None`` when the job is gone or fails ``check``.
        """
        key = self._k("job", job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    job = self._load(pipe.get(key))
                    if job is None or not check(job):
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    result = write(pipe, job)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def _jobs(self, ids: Sequence[bytes | str]) -> list[tuple[str, Job | None]]:
        names = [i.decode() if isinstance(i, bytes) else i for i in ids]
        if not names:
            return []
        raws = self.r.mget([self._k("job", i) for i in names])
        return [(name, self._load(raw)) for name, raw in zip(names, raws, strict=True)]

    def _unindex_unless(self, index: str, job_id: str, status: str, kind: str,
                        field: str = "status") -> None:
        """Remove ``job_id`` from ``index`` unless its job's ``field`` is ``status`` now."""
        self._unindex(keys=[index, self._k("job", job_id)], args=[job_id, status, kind, field])

    def queued(self, limit: int) -> list[Job]:
        """The oldest queued, unexpired jobs, oldest first."""
        now = time.time()
        out: list[Job] = []
        for job_id, job in self._jobs(self.r.zrange(self._k("queued"), 0, max(0, limit * 2))):
            if job is None or job.status != QUEUED:
                self._unindex_unless(self._k("queued"), job_id, QUEUED, "z")  # stale entry
            elif job.expires_at > now:
                out.append(job)
        return out[:limit]

    def count(self, statuses: Sequence[str], dialect: str | None = None,
              scope: str | None = None) -> int:
        """How many unexpired jobs are in ``statuses``."""
        if dialect is None and scope is None and tuple(statuses) == (QUEUED,):
            return int(self.r.zcard(self._k("queued")))
        now = time.time()
        if dialect is not None and scope is not None:
            return sum(1 for head in self._heads(dialect, scope).values()
                       if head.status in statuses and head.expires_at > now)
        ids = list(self.r.zrange(self._k("queued"), 0, -1)) + \
            list(self.r.smembers(self._k("running")))
        return sum(1 for _, job in self._jobs(ids)
                   if job is not None and job.status in statuses and job.expires_at > now
                   and (dialect is None or job.dialect == dialect))

    def active_counts(self) -> dict[tuple[str, str], int]:
        """Unexpired queued and running jobs (as stored) by (dialect, status), in one read."""
        ids = list(self.r.zrange(self._k("queued"), 0, -1)) + \
            list(self.r.smembers(self._k("running")))
        now = time.time()
        out: dict[tuple[str, str], int] = {}
        for _, job in self._jobs(ids):
            if job is not None and job.status in ACTIVE and job.expires_at > now:
                out[(job.dialect, job.status)] = out.get((job.dialect, job.status), 0) + 1
        return out

    def stats(self, dialect: str, scope: str) -> dict[str, int]:
        """Counts by :func:`~inference.tasks.client_status`, plus ``retried``."""
        out = dict.fromkeys((*ACTIVE, *FINISHED), 0)
        out["retried"] = 0
        now = time.time()
        for head in self._heads(dialect, scope).values():
            if head.expires_at > now:
                out[head.client_status()] += 1
                out["retried"] += head.retried
        return out

    def purge_queued(self, dialect: str, scope: str) -> list[str]:
        """Delete the queued jobs of one dialect and scope; return their ids."""
        return [job_id for job_id, head in self._heads(dialect, scope).items()
                if head.status == QUEUED and self._delete_if_queued(job_id)]

    def list_jobs(self, dialect: str, scope: str, *, statuses: Sequence[str] | None = None,
                  since: float | None = None, until: float | None = None,
                  payload_match: Mapping[str, str] | None = None, offset: int = 0,
                  limit: int = 100) -> tuple[list[Job], int]:
        """One page of one dialect and scope's unexpired jobs, newest first, and the total.

        The scope's time index gives the ids in the window, newest first (equal times: id
        descending, as the SQLite store orders them), and the expiry index the expired ones.
        A status filter goes by the scope's heads (:meth:`_heads`), so without a payload filter
        only the page's jobs are read; with one, the jobs that pass the rest are read in chunks
        (a scope holds only its jobs of the last ``--job-ttl-s``).
        """
        check_list_args(payload_match, offset, limit)
        tkey = self._time_key(dialect, scope)
        self._index_times(dialect, scope)
        low = "-inf" if since is None else repr(float(since))
        high = "+inf" if until is None else f"({float(until)!r}"
        now = time.time()
        expired = {i.decode() for i in self.r.zrangebyscore(self._k("expiry"), "-inf", now)}
        ids = [i for i in (b.decode() for b in self.r.zrevrangebyscore(tkey, high, low))
               if i not in expired]
        match = dict(payload_match or {})
        if statuses is not None:
            heads = self._heads(dialect, scope)
            ids = [i for i in ids if (head := heads.get(i)) is not None
                   and head.expires_at > now and head.client_status() in statuses]
        if not match:
            page = []
            for job_id, job in self._jobs(ids[offset:offset + limit]):
                if job is None:
                    self._drop_stale(dialect, scope, job_id)
                elif job.expires_at > now and (statuses is None
                                               or client_status(job) in statuses):
                    # (A job can move on between its head's read and its own.)
                    page.append(job)
            return page, len(ids)
        found: list[Job] = []
        total = 0
        for start in range(0, len(ids), LIST_CHUNK):
            for job_id, job in self._jobs(ids[start:start + LIST_CHUNK]):
                if job is None:
                    self._drop_stale(dialect, scope, job_id)
                    continue
                if job.expires_at <= now or (statuses is not None and
                                             client_status(job) not in statuses):
                    continue
                payload = job.payload if isinstance(job.payload, dict) else {}
                if any(payload.get(k) != v for k, v in match.items()):
                    continue
                if offset <= total < offset + limit:
                    found.append(job)
                total += 1
        return found, total

    def _index_times(self, dialect: str, scope: str) -> None:
        """Add to the time index the scope's jobs it lacks (jobs stored before it existed)."""
        skey, tkey = self._scope_key(dialect, scope), self._time_key(dialect, scope)
        if self.r.scard(skey) <= self.r.zcard(tkey):
            return
        timed = {i.decode() for i in self.r.zrange(tkey, 0, -1)}
        missing = [i.decode() for i in self.r.smembers(skey) if i.decode() not in timed]
        for job_id, job in self._jobs(missing):
            if job is None:
                self.r.srem(skey, job_id)
            else:
                self.r.zadd(tkey, {job_id: job.created_at})

    def _drop_stale(self, dialect: str, scope: str, job_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        self._unscope(pipe, dialect, scope, job_id)
        pipe.execute()

    def _unscope(self, pipe: Any, dialect: str, scope: str, job_id: str) -> None:
        pipe.srem(self._scope_key(dialect, scope), job_id)
        pipe.zrem(self._time_key(dialect, scope), job_id)
        pipe.hdel(self._heads_key(dialect, scope), job_id)
        pipe.delete(self._k("owner", job_id))

    def _drop_keyless(self, job_id: str) -> None:
        """Drop the index entries of a job whose key is gone (it cannot say its scope)."""
        owner = self.r.get(self._k("owner", job_id))
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self._k("expiry"), job_id)
        self._unindex_webhook(pipe, job_id)
        # None: stored by an older server, or no sweep for two graces; dropped when its scope is read
        if owner is not None:
            dialect, scope = msgspec.json.decode(owner, type=tuple[str, str])
            self._unscope(pipe, dialect, scope, job_id)
        pipe.execute()

    def _drop_orphan_heads(self, key: str, stored: Mapping[bytes, bytes], ids: set[str]) -> None:
        """Delete from hash ``key`` the heads read as ``stored`` whose job is not in ``ids``.

        Such a job's index entry was removed by a server that knows no heads.
        """
        orphans = [name for name in stored if name.decode() not in ids]
        if orphans:
            self.r.hdel(key, *orphans)

    def _heads(self, dialect: str, scope: str) -> dict[str, StatusHead]:
        """Every job of the scope and its head, reading only the jobs a head cannot vouch for.

        A finished job's head is what this server's kind last wrote with the job, so it is
        taken as is, unless the scope's time index dates the job otherwise: an older server,
        which writes no heads, retried it since (a retry renews the creation time, and every
        version indexes that). A queued or running job's head is checked against the job (an
        older server may have moved it on: there are only as many of those as the queue
        holds), and so is a job without a head (stored by an older server). Heads of jobs no
        longer in the scope (unlinked by an older server), and members whose job key must be
        gone (past its expiry and grace) or is, are dropped.
        """
        skey, hkey = self._scope_key(dialect, scope), self._heads_key(dialect, scope)
        pipe = self.r.pipeline(transaction=True)  # one snapshot of all three
        pipe.smembers(skey)
        pipe.hgetall(hkey)
        pipe.zrange(self._time_key(dialect, scope), 0, -1, withscores=True)
        members, stored, timed = pipe.execute()
        created = {name.decode(): score for name, score in timed}
        ids = {i.decode() for i in members}
        self._drop_orphan_heads(hkey, stored, ids)
        gone_before = time.time() - GRACE_S
        heads: dict[str, StatusHead] = {}
        check: list[str] = []
        for job_id in ids:
            raw = stored.get(job_id.encode())
            head = None if raw is None else msgspec.json.decode(raw, type=StatusHead)
            if head is not None and head.expires_at < gone_before:
                self._drop_stale(dialect, scope, job_id)
            elif (head is None or head.status in ACTIVE
                  or created.get(job_id) != head.created_at):
                check.append(job_id)
            else:
                heads[job_id] = head
        for start in range(0, len(check), LIST_CHUNK):
            for job_id, job in self._jobs(check[start:start + LIST_CHUNK]):
                if job is None:
                    self._drop_stale(dialect, scope, job_id)
                else:
                    heads[job_id] = StatusHead.of(job)
        return heads

    def _delete_if_queued(self, job_id: str) -> bool:
        def unlink(pipe: Any, job: Job) -> bool:
            self._unlink(pipe, job)
            return True

        return bool(self._compare_and_set(job_id, lambda job: job.status == QUEUED, unlink))

    def _unlink(self, pipe: Any, job: Job) -> None:
        pipe.delete(self._k("job", job.id))
        for i in range(len(job.result.images) if job.result else 0):
            pipe.delete(self._k("img", job.id, str(i)))
        pipe.zrem(self._k("queued"), job.id)
        pipe.srem(self._k("running"), job.id)
        pipe.zrem(self._k("expiry"), job.id)
        self._unindex_webhook(pipe, job.id)
        self._unscope(pipe, job.dialect, job.scope, job.id)

    # -- replicas --------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Mark ``worker_id`` alive for ``ttl_s`` more seconds."""
        self.r.set(self._k("worker", worker_id), b"1", px=max(1, int(ttl_s * 1000)))

    def worker_alive(self, worker_id: str | None) -> bool:
        """Whether ``worker_id``'s heartbeat is still there."""
        return worker_id is not None and bool(self.r.exists(self._k("worker", worker_id)))

    def reclaim(self, max_requeues: int = MAX_REQUEUES, reason: str = INTERRUPTED_REASON,
                dead: Collection[str] = ()) -> tuple[int, int]:
        """Running jobs of replicas whose heartbeat is gone: re-queue once, then fail."""
        running = []
        for job_id, job in self._jobs(list(self.r.smembers(self._k("running")))):
            if job is None or job.status != RUNNING:
                self._unindex_unless(self._k("running"), job_id, RUNNING, "s")
            else:
                running.append(job)
        return reclaim_jobs(self, running, max_requeues, reason, dead)

    def pending_webhooks(self, limit: int = WEBHOOK_SCAN) -> list[WebhookHead]:
        """Heads of unexpired jobs with a pending webhook (the outbox), earliest claim end first.

        Read from ``P:webhook_heads``; an entry of ``P:webhooks`` without a head (written by a
        server from before heads existed) is read from its job, and dropped if stale. A head
        without an entry (its delivery ended on such a server, which removes the entry alone)
        is deleted.
        """
        key, heads_key = self._k("webhooks"), self._k("webhook_heads")
        pipe = self.r.pipeline(transaction=True)  # one snapshot of both
        pipe.smembers(key)
        pipe.hgetall(heads_key)
        members, stored = pipe.execute()
        ids = {i.decode() for i in members}
        self._drop_orphan_heads(heads_key, stored, ids)
        heads: list[WebhookHead] = []
        headless: list[str] = []
        for job_id in ids:
            raw = stored.get(job_id.encode())
            if raw is None:
                headless.append(job_id)
            else:
                heads.append(msgspec.json.decode(raw, type=WebhookHead))
        for job_id, job in self._jobs(headless):
            if job is None or job.webhook_state != WEBHOOK_PENDING:
                self._unindex_unless(key, job_id, WEBHOOK_PENDING, "s", "webhook_state")
            elif job.status in FINISHED:
                heads.append(WebhookHead.of(job))
        now = time.time()
        return sorted((h for h in heads if h.expires_at > now), key=lambda h: h.until)[:limit]

    # -- results ---------------------------------------------------------------------------

    def save_images(self, job_id: str, images: Sequence[tuple[bytes, str, int, int, int]],
                    expires_at: float | None = None) -> list[StoredImage]:
        """Store result images next to the job, expiring with it (``expires_at``: the job's)."""
        if expires_at is None:
            job = self.get(job_id)
            expires_at = job.expires_at if job else time.time() + GRACE_S
        expires = expires_at + GRACE_S
        pipe = self.r.pipeline(transaction=False)
        stored = []
        for i, (data, media_type, seed, width, height) in enumerate(images):
            pipe.set(self._k("img", job_id, str(i)), data, pxat=int(expires * 1000))
            stored.append(StoredImage(file=f"{i}.{_EXT.get(media_type, 'png')}",
                                      media_type=media_type, seed=seed, width=width,
                                      height=height))
        pipe.execute()
        return stored

    def read_image(self, job_id: str, image: StoredImage) -> bytes:
        """The bytes of one stored result image."""
        index = image.file.split(".", 1)[0]
        data = self.r.get(self._k("img", job_id, index))
        if data is None:
            raise FileNotFoundError(f"result image {image.file} of job {job_id} is gone")
        return data

    def expired(self, now: float | None = None) -> list[Job]:
        """Jobs whose ``expires_at`` has passed."""
        ids = self.r.zrangebyscore(self._k("expiry"), "-inf", time.time() if now is None else now)
        out = []
        for job_id, job in self._jobs(list(ids)):
            if job is None:  # its key outlived by GRACE_S (no sweep for that long) or evicted
                self._drop_keyless(job_id)
            else:
                out.append(job)
        return out

    def delete(self, job_id: str) -> None:
        """Remove a job, its images and its index entries."""
        job = self._load(self.r.get(self._k("job", job_id)))
        if job is None:
            self._drop_keyless(job_id)
            return
        pipe = self.r.pipeline(transaction=True)
        self._unlink(pipe, job)
        pipe.execute()
