"""A durable store of asynchronous generation jobs.

Dialect-neutral: a job carries its dialect's own request as an opaque JSON ``payload`` and, once
done, the canonical result (image files on disk plus their seeds). Each task API (RunPod today;
Alibaba and ModelsLab later) renders its own status bodies from a :class:`Job`.

:class:`TaskStore` is the interface; :class:`SqliteTaskStore` keeps jobs in one SQLite file and
result images in a folder next to it. A Redis store can implement the same protocol.

Calls are synchronous (SQLite in WAL mode, one connection behind a lock, usable from any
thread); a server on an event loop makes every call on a worker thread
(``gateway/task_store_async.py``), since even a short call stalls every request while it runs.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
ACTIVE = (QUEUED, RUNNING)
FINISHED = (COMPLETED, FAILED, CANCELLED, TIMED_OUT)

WEBHOOK_PENDING = "pending"
WEBHOOK_SENT = "sent"
WEBHOOK_FAILED = "failed"
# A delivery is claimed (and sent with the sender's own retries) at most this many times: the
# first by the server that finished the job, the others after that server stopped or its claim
# ran out. Past it the delivery is marked failed.
MAX_WEBHOOK_ROUNDS = 3
# Final jobs with a pending webhook read per look for deliveries to resume.
WEBHOOK_SCAN = 500
_WEBHOOK_RESET: dict[str, Any] = {"webhook_state": None, "webhook_owner": None,
                                  "webhook_until": 0.0, "webhook_rounds": 0}

INTERRUPTED_REASON = ("the server running this job stopped before it finished, and the job "
                      "was already re-queued once after such a stop; retry it")
# Payload keys ``list_jobs`` may match on: plain names (they become a JSON path in SQL).
PAYLOAD_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# A job whose server died (crash, kill, restart) goes back to the queue this many times; the
# next interruption fails it with INTERRUPTED_REASON (a job that kills its server each time
# must not take every replica down in turn).
MAX_REQUEUES = 1


class StoredImage(msgspec.Struct, kw_only=True):
    """One result image on disk (``file`` is relative to the job's result folder)."""

    file: str
    media_type: str
    seed: int
    width: int
    height: int


class StoredResult(msgspec.Struct, kw_only=True):
    """The canonical result of a finished job."""

    images: list[StoredImage]
    seed: int
    model: str = ""
    prompt_tokens: int = 0


class Job(msgspec.Struct, kw_only=True):
    """One asynchronous job. Times are Unix seconds."""

    id: str
    dialect: str
    # Who may see the job (the dialect decides: e.g. endpoint id and API key owner).
    scope: str
    payload: Any
    status: str = QUEUED
    created_at: float = 0.0
    # When the engine started the job's first batch: ``None`` while it waits, also once a
    # server has taken it (``running``) and handed it to the engine's queue.
    started_at: float | None = None
    finished_at: float | None = None
    # The job and its result are deleted at this time, whatever its state.
    expires_at: float = 0.0
    execution_timeout_s: float = 600.0
    webhook: str | None = None
    error: str | None = None
    result: StoredResult | None = None
    worker_id: str | None = None
    retries: int = 0
    # Images the job will make, for admission control.
    images: int = 1
    # Times the job was put back in the queue because the server running it died.
    requeues: int = 0
    # Names of the job's images in the media store (URL-mode dialects) and when they were put.
    media: list[str] = []
    media_at: float = 0.0
    # The webhook outbox (jobs with a ``webhook`` only): PENDING from the write that makes the
    # job final until a server's delivery ends (WEBHOOK_SENT / WEBHOOK_FAILED). A pending
    # delivery is claimed by one server at a time (``webhook_owner``, a worker id, until
    # ``webhook_until``); ``webhook_rounds`` counts the claims, so a delivery interrupted by
    # one restart after another is given up (see :func:`claim_webhooks`).
    webhook_state: str | None = None
    webhook_owner: str | None = None
    webhook_until: float = 0.0
    webhook_rounds: int = 0


class WebhookHead(msgspec.Struct, frozen=True, kw_only=True):
    """A pending delivery as the outbox looks for work: its job's outbox fields, not its document.

    Stores index these beside the job (SQLite columns, a Redis hash) so that a look for
    deliveries to resume never reads, let alone parses, every pending job's document: a job's
    payload can be a 20 MB data URL, and a receiver that is down keeps many pending at once.
    """

    id: str
    dialect: str
    owner: str | None = None
    until: float = 0.0
    rounds: int = 0
    expires_at: float = 0.0

    @classmethod
    def of(cls, job: Job) -> WebhookHead:
        """``job``'s head (whatever its webhook state)."""
        return cls(id=job.id, dialect=job.dialect, owner=job.webhook_owner,
                   until=job.webhook_until, rounds=job.webhook_rounds, expires_at=job.expires_at)


def client_status(job: Job) -> str:
    """``job``'s status as clients see it: a ``running`` job not started yet is ``queued``.

    A server marks a job ``running`` when it takes it (so no other server does), but the job
    only starts when the engine starts its first batch (``started_at``); until then it waits
    (in the engine's queue, or for its inputs) like any queued job. Every view of a job (its
    status, task lists, counts) goes by this, on every replica.
    """
    return QUEUED if job.status == RUNNING and job.started_at is None else job.status


class TaskStore(Protocol):
    """What the job runner and the task dialects need from a job store."""

    def open(self) -> None:
        """Create or open the store."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...

    def create(self, job: Job) -> None:
        """Insert a new job."""
        ...

    def get(self, job_id: str, now: float | None = None) -> Job | None:
        """The job, or ``None`` when unknown or expired."""
        ...

    def update(self, job_id: str, expect: Sequence[str] | None = None, *,
               owner: str | None = None, where: Mapping[str, Any] | None = None,
               **changes: Any) -> Job | None:
        """Apply ``changes`` if the job's status is in ``expect`` (any when ``None``).

        When ``owner`` is given the job's ``worker_id`` must also be ``owner``, and each field
        named in ``where`` must hold the value given. Returns the updated job, or ``None`` when
        nothing matched.
        """
        ...

    def queued(self, limit: int) -> list[Job]:
        """The oldest queued jobs, oldest first."""
        ...

    def count(self, statuses: Sequence[str], dialect: str | None = None,
              scope: str | None = None) -> int:
        """How many jobs are in ``statuses`` as stored (optionally of one dialect and scope)."""
        ...

    def stats(self, dialect: str, scope: str) -> dict[str, int]:
        """Counts by :func:`client_status`, plus ``retried`` (jobs retried at least once)."""
        ...

    def active_counts(self) -> dict[tuple[str, str], int]:
        """Unexpired queued and running jobs (as stored) by (dialect, status), in one pass."""
        ...

    def purge_queued(self, dialect: str, scope: str) -> list[str]:
        """Delete the queued jobs of one dialect and scope; return their ids."""
        ...

    def list_jobs(self, dialect: str, scope: str, *, statuses: Sequence[str] | None = None,
                  since: float | None = None, until: float | None = None,
                  payload_match: Mapping[str, str] | None = None, offset: int = 0,
                  limit: int = 100) -> tuple[list[Job], int]:
        """One page of the unexpired jobs of one dialect and scope, newest first, and the total.

        Filters (all optional, all must hold): :func:`client_status` in ``statuses``;
        ``since <= created_at < until``; ``payload[key] == value`` for each entry of
        ``payload_match`` (string values, keys matching :data:`PAYLOAD_KEY`). Order:
        ``created_at`` descending, then ``id`` descending. ``total`` counts every matching job, not only this page's.
        """
        ...

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Say that ``worker_id`` (one server) is alive for the next ``ttl_s`` seconds."""
        ...

    def worker_alive(self, worker_id: str | None) -> bool:
        """Whether the server that runs jobs as ``worker_id`` is still alive."""
        ...

    def reclaim(self, max_requeues: int = MAX_REQUEUES, reason: str = INTERRUPTED_REASON,
                dead: Collection[str] = ()) -> tuple[int, int]:
        """Running jobs whose worker is gone: re-queue (up to ``max_requeues`` times) or fail.

        ``dead``: workers known to be gone whatever their heartbeat says (a server restarted
        under a fixed replica id reclaims what its previous run left running). Queued jobs and
        jobs of live workers are never touched. Returns (requeued, failed).
        """
        ...

    def pending_webhooks(self, limit: int = WEBHOOK_SCAN) -> list[WebhookHead]:
        """The heads of unexpired final jobs whose webhook is :data:`WEBHOOK_PENDING`.

        Claimed or not, the earliest claim's end first; no job document is read for them.
        """
        ...

    def save_images(self, job_id: str, images: Sequence[tuple[bytes, str, int, int, int]],
                    expires_at: float | None = None) -> list[StoredImage]:
        """Write result images (data, media type, seed, width, height).

        ``expires_at`` is the job's (it never changes); a store that expires images with their
        job need not read the job back for it.
        """
        ...

    def read_image(self, job_id: str, image: StoredImage) -> bytes:
        """The bytes of one stored result image."""
        ...

    def expired(self, now: float | None = None) -> list[Job]:
        """Jobs whose ``expires_at`` has passed."""
        ...

    def delete(self, job_id: str) -> None:
        """Remove a job and its result files."""
        ...


_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    dialect TEXT NOT NULL,
    scope TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    retries INTEGER NOT NULL DEFAULT 0,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_scope ON jobs (dialect, scope, status);
"""
# The webhook outbox's fields are columns (added to stores made before them), copies of the
# JSON doc's: a partial index over json_extract(doc) made every write of a large job (a 20 MB
# data: URL payload) parse its document twice more, under the store's lock, and a look for
# deliveries to resume that read the documents parsed every pending one (WebhookHead).
_OUTBOX_COLUMNS = {"webhook_state": "TEXT", "webhook_owner": "TEXT", "webhook_until": "REAL",
                   "webhook_rounds": "INTEGER"}
# Covering: the look reads the index alone. A row's columns after its document (the ones added
# to older stores) are reached only through the document's overflow pages.
_OUTBOX_INDEX = ("CREATE INDEX IF NOT EXISTS jobs_webhook_heads ON jobs (webhook_until, "
                 "expires_at, id, dialect, webhook_owner, webhook_rounds, webhook_state) "
                 f"WHERE webhook_state = '{WEBHOOK_PENDING}'")
_OUTBOX_OLD_INDEX = "DROP INDEX IF EXISTS jobs_webhook_state"
# Pending deliveries written before the owner/until/rounds columns existed: filled in once.
_OUTBOX_BACKFILL = (
    "UPDATE jobs SET " + ", ".join(
        f"{name} = json_extract(CAST(doc AS TEXT), '$.{name}')"
        for name in ("webhook_owner", "webhook_until", "webhook_rounds"))
    + f" WHERE webhook_state = '{WEBHOOK_PENDING}' AND webhook_until IS NULL")
# The columns an update may change (a retry gives a job a new creation time, as the Redis
# store's lists see it), and with them the ones a job is created with.
_CHANGING = ("status", "created_at", "expires_at", "retries", *_OUTBOX_COLUMNS, "doc")
_COLUMNS = ("id", "dialect", "scope", *_CHANGING)
_INSERT = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_UPDATE = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _CHANGING)} WHERE id = ?"


def _changing(job: Job) -> tuple[Any, ...]:
    """``job``'s values for :data:`_CHANGING`."""
    return (job.status, job.created_at, job.expires_at, job.retries, job.webhook_state,
            job.webhook_owner, job.webhook_until, job.webhook_rounds, msgspec.json.encode(job))
# client_status() in SQL: the start time lives in the JSON doc, read only for running rows.
_CLIENT_STATUS = (f"(CASE WHEN status = '{RUNNING}' AND json_extract(CAST(doc AS TEXT), "
                  f"'$.started_at') IS NULL THEN '{QUEUED}' ELSE status END)")


class SqliteTaskStore:
    """Jobs in SQLite (``path``), result images under ``results_dir/<job id>/``."""

    #: One process per store (the data dir lock sees to it): no other server shares its jobs.
    shared = False

    def __init__(self, path: Path, results_dir: Path) -> None:
        self.path = path
        self.results_dir = results_dir
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._workers: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders and the schema."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        for name, kind in _OUTBOX_COLUMNS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        conn.execute(_OUTBOX_OLD_INDEX)
        conn.execute(_OUTBOX_INDEX)
        conn.execute(_OUTBOX_BACKFILL)
        self._conn = conn

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection."""
        if self._conn is None:
            raise RuntimeError("task store is not open")
        return self._conn

    # -- jobs ------------------------------------------------------------------------------

    def create(self, job: Job) -> None:
        """Insert a new job."""
        with self._lock:
            self.conn.execute(_INSERT, (job.id, job.dialect, job.scope, *_changing(job)))

    def get(self, job_id: str, now: float | None = None) -> Job | None:
        """The job, or ``None`` when unknown or expired."""
        with self._lock:
            row = self.conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = msgspec.json.decode(row[0], type=Job)
        if job.expires_at <= (time.time() if now is None else now):
            return None
        return job

    def update(self, job_id: str, expect: Sequence[str] | None = None, *,
               owner: str | None = None, where: Mapping[str, Any] | None = None,
               **changes: Any) -> Job | None:
        """Apply ``changes`` if status, worker and ``where``'s fields match."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    conn.execute("ROLLBACK")
                    return None
                job = msgspec.json.decode(row[0], type=Job)
                if not matches(job, expect, owner, where):
                    conn.execute("ROLLBACK")
                    return None
                job = apply_changes(job, changes)
                conn.execute(_UPDATE, (*_changing(job), job_id))
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) has already rolled back: a ROLLBACK
                # then raises "no transaction is active" and hides the real error.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return job

    def queued(self, limit: int) -> list[Job]:
        """The oldest queued, unexpired jobs, oldest first."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT doc FROM jobs WHERE status = ? AND expires_at > ? "
                "ORDER BY created_at LIMIT ?",
                (QUEUED, time.time(), limit),
            ).fetchall()
        return [msgspec.json.decode(r[0], type=Job) for r in rows]

    def count(self, statuses: Sequence[str], dialect: str | None = None,
              scope: str | None = None) -> int:
        """How many unexpired jobs are in ``statuses``."""
        sql = f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' * len(statuses))})" \
              " AND expires_at > ?"
        args: list[Any] = [*statuses, time.time()]
        if dialect is not None:
            sql += " AND dialect = ?"
            args.append(dialect)
        if scope is not None:
            sql += " AND scope = ?"
            args.append(scope)
        with self._lock:
            return int(self.conn.execute(sql, args).fetchone()[0])

    def active_counts(self) -> dict[tuple[str, str], int]:
        """Unexpired queued and running jobs (as stored) by (dialect, status), in one query."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT dialect, status, COUNT(*) FROM jobs WHERE status IN (?, ?) "
                "AND expires_at > ? GROUP BY dialect, status", (*ACTIVE, time.time()),
            ).fetchall()
        return {(dialect, status): int(n) for dialect, status, n in rows}

    def stats(self, dialect: str, scope: str) -> dict[str, int]:
        """Counts by :func:`client_status`, plus ``retried``."""
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_CLIENT_STATUS} AS seen, COUNT(*), SUM(retries > 0) FROM jobs "
                "WHERE dialect = ? AND scope = ? AND expires_at > ? GROUP BY seen",
                (dialect, scope, time.time()),
            ).fetchall()
        out = dict.fromkeys((*ACTIVE, *FINISHED), 0)
        out["retried"] = 0
        for status, n, retried in rows:
            out[status] = int(n)
            out["retried"] += int(retried or 0)
        return out

    def purge_queued(self, dialect: str, scope: str) -> list[str]:
        """Delete the queued jobs of one dialect and scope; return their ids."""
        with self._lock:
            conn = self.conn
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE dialect = ? AND scope = ? AND status = ?",
                (dialect, scope, QUEUED),
            ).fetchall()]
            conn.executemany("DELETE FROM jobs WHERE id = ? AND status = ?",
                             [(i, QUEUED) for i in ids])
        return ids

    def list_jobs(self, dialect: str, scope: str, *, statuses: Sequence[str] | None = None,
                  since: float | None = None, until: float | None = None,
                  payload_match: Mapping[str, str] | None = None, offset: int = 0,
                  limit: int = 100) -> tuple[list[Job], int]:
        """One page of one dialect and scope's unexpired jobs, newest first, and the total."""
        check_list_args(payload_match, offset, limit)
        where = "dialect = ? AND scope = ? AND expires_at > ?"
        args: list[Any] = [dialect, scope, time.time()]
        if statuses is not None:
            if not statuses:
                return [], 0
            where += f" AND {_CLIENT_STATUS} IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        if since is not None:
            where += " AND created_at >= ?"
            args.append(since)
        if until is not None:
            where += " AND created_at < ?"
            args.append(until)
        for key, value in (payload_match or {}).items():
            # The doc is a BLOB of JSON text; the key is a checked plain name.
            where += " AND json_extract(CAST(doc AS TEXT), ?) = ?"
            args.extend((f"$.payload.{key}", value))
        with self._lock:
            total = int(self.conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args
                                          ).fetchone()[0])
            rows = self.conn.execute(
                f"SELECT doc FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC "
                "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return [msgspec.json.decode(r[0], type=Job) for r in rows], total

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Register ``worker_id`` as alive (for as long as this process runs)."""
        self._workers.add(worker_id)

    def worker_alive(self, worker_id: str | None) -> bool:
        """Only this process's own workers are alive: the data dir lock excludes any other."""
        return worker_id is not None and worker_id in self._workers

    def reclaim(self, max_requeues: int = MAX_REQUEUES, reason: str = INTERRUPTED_REASON,
                dead: Collection[str] = ()) -> tuple[int, int]:
        """Running jobs of dead workers: back to the queue once, then failed."""
        with self._lock:
            rows = self.conn.execute("SELECT doc FROM jobs WHERE status = ?", (RUNNING,)
                                     ).fetchall()
        return reclaim_jobs(self, [msgspec.json.decode(r[0], type=Job) for r in rows],
                            max_requeues, reason, dead)

    def pending_webhooks(self, limit: int = WEBHOOK_SCAN) -> list[WebhookHead]:
        """Heads of unexpired jobs with a pending webhook, earliest claim end first."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT id, dialect, webhook_owner, webhook_until, webhook_rounds, expires_at "
                f"FROM jobs WHERE webhook_state = '{WEBHOOK_PENDING}' AND expires_at > ? "
                "ORDER BY webhook_until LIMIT ?", (time.time(), limit),
            ).fetchall()
        return [WebhookHead(id=r[0], dialect=r[1], owner=r[2], until=r[3] or 0.0,
                            rounds=r[4] or 0, expires_at=r[5]) for r in rows]

    # -- results ---------------------------------------------------------------------------

    def save_images(self, job_id: str, images: Sequence[tuple[bytes, str, int, int, int]],
                    expires_at: float | None = None) -> list[StoredImage]:
        """Write result images to ``results_dir/<job id>/<i>.<ext>`` (the sweeper deletes them)."""
        folder = self.results_dir / _safe_id(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        stored = []
        for i, (data, media_type, seed, width, height) in enumerate(images):
            name = f"{i}.{_EXT.get(media_type, 'png')}"
            tmp = folder / f".{name}.tmp"
            try:
                tmp.write_bytes(data)
                tmp.replace(folder / name)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk must not keep half an image
                raise
            stored.append(StoredImage(file=name, media_type=media_type, seed=seed, width=width,
                                      height=height))
        return stored

    def read_image(self, job_id: str, image: StoredImage) -> bytes:
        """The bytes of one stored result image."""
        return (self.results_dir / _safe_id(job_id) / Path(image.file).name).read_bytes()

    def expired(self, now: float | None = None) -> list[Job]:
        """Jobs whose ``expires_at`` has passed."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT doc FROM jobs WHERE expires_at <= ?",
                (time.time() if now is None else now,),
            ).fetchall()
        return [msgspec.json.decode(r[0], type=Job) for r in rows]

    def delete(self, job_id: str) -> None:
        """Remove a job and its result files."""
        with self._lock:
            self.conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.results_dir / _safe_id(job_id), ignore_errors=True)


def matches(job: Job, expect: Sequence[str] | None, owner: str | None,
            where: Mapping[str, Any] | None) -> bool:
    """The compare half of :meth:`TaskStore.update`'s compare-and-set."""
    return ((expect is None or job.status in expect)
            and (owner is None or job.worker_id == owner)
            and all(getattr(job, name) == value for name, value in (where or {}).items()))


def apply_changes(job: Job, changes: Mapping[str, Any]) -> Job:
    """``job`` with ``changes``, as both stores' :meth:`TaskStore.update` write it.

    The webhook outbox lives here so no writer can skip it: the write that makes a job final
    (the runner's outcome, a cancel, a reclaim that fails it) also makes its webhook pending,
    so a crash right after it leaves a delivery to resume, never a lost one. Claim fields given
    with that write (the runner claims the delivery it is about to make) are kept. A job that
    leaves its final state (a client's retry) starts its outbox afresh; so does any job
    without a webhook, which has no outbox at all.
    """
    new = msgspec.structs.replace(job, **changes)
    entering = new.status in FINISHED and job.status not in FINISHED
    if new.webhook is None or new.status not in FINISHED:
        if new.webhook_state is not None or new.webhook_owner is not None:
            new = msgspec.structs.replace(new, **_WEBHOOK_RESET)
    elif entering:
        fresh = {**_WEBHOOK_RESET, "webhook_state": WEBHOOK_PENDING}
        new = msgspec.structs.replace(new, **{k: v for k, v in fresh.items() if k not in changes})
    return new


def webhook_claim(worker_id: str, lease_s: float, rounds: int = 1) -> dict[str, Any]:
    """The changes that make ``worker_id`` the sender of a job's pending webhook for ``lease_s``."""
    return {"webhook_owner": worker_id, "webhook_until": time.time() + lease_s,
            "webhook_rounds": rounds}


def webhook_unclaimed(head: WebhookHead, now: float, alive: Callable[[str], bool],
                      dead: Collection[str] = ()) -> bool:
    """Whether no live server is sending the delivery ``head`` describes.

    Unclaimed, claimed for longer than the claim's lease (a sender whose last write was lost),
    or claimed by a server now dead (listed in ``dead``, or not ``alive``: heartbeat gone).
    """
    owner = head.owner
    return owner is None or owner in dead or head.until <= now or not alive(owner)


def webhook_claimable(job: Job, now: float, alive: Callable[[str], bool],
                      dead: Collection[str] = ()) -> bool:
    """Whether a final job's pending webhook may be claimed (:func:`webhook_unclaimed`)."""
    if job.webhook_state != WEBHOOK_PENDING or job.status not in FINISHED or job.webhook is None:
        return False
    return webhook_unclaimed(WebhookHead.of(job), now, alive, dead)


def claim_webhooks(store: TaskStore, worker_id: str, lease_s: float, dead: Collection[str] = (),
                   max_rounds: int = MAX_WEBHOOK_ROUNDS, dialects: Collection[str] | None = None,
                   limit: int = WEBHOOK_SCAN) -> tuple[list[Job], list[Job]]:
    """Claim, for ``worker_id``, the pending webhooks no live server is sending.

    Picked by their heads (:meth:`TaskStore.pending_webhooks`); only a delivery that looks
    claimable has its job read, and checked again. Each claim is a compare-and-set on the
    delivery as that read found it (owner, round, outcome), so of two servers that read the
    same delivery only one claims it. A delivery already claimed ``max_rounds`` times is marked
    failed instead. ``dialects``: only jobs of these (the ones this server can render).
    Returns (claimed, given up), the jobs as written.
    """
    now = time.time()
    claimed: list[Job] = []
    given_up: list[Job] = []
    # One liveness read per owner and pass: many deliveries in flight have few owners.
    seen: dict[str, bool] = {}

    def alive(owner: str) -> bool:
        if owner not in seen:
            seen[owner] = store.worker_alive(owner)
        return seen[owner]

    for head in store.pending_webhooks(limit):
        if dialects is not None and head.dialect not in dialects:
            continue
        if not webhook_unclaimed(head, now, alive, dead):
            continue
        job = store.get(head.id, now)
        if job is None or not webhook_claimable(job, now, alive, dead):
            continue
        where = {"webhook_state": WEBHOOK_PENDING, "webhook_owner": job.webhook_owner,
                 "webhook_rounds": job.webhook_rounds, "finished_at": job.finished_at}
        if job.webhook_rounds >= max_rounds:
            done = store.update(job.id, FINISHED, where=where, webhook_state=WEBHOOK_FAILED,
                                webhook_owner=None, webhook_until=0.0)
            if done is not None:
                given_up.append(done)
            continue
        done = store.update(job.id, FINISHED, where=where,
                            **webhook_claim(worker_id, lease_s, job.webhook_rounds + 1))
        if done is not None:
            claimed.append(done)
    return claimed, given_up


def settle_webhook(store: TaskStore, job: Job, worker_id: str, sent: bool) -> Job | None:
    """Record the end of ``worker_id``'s delivery of ``job``'s webhook (as claimed in ``job``).

    Only while the delivery is still this claim's: a job retried, re-claimed after the lease,
    or given up meanwhile is left as it is. ``None`` when nothing was written.
    """
    where = {"webhook_state": WEBHOOK_PENDING, "webhook_owner": worker_id,
             "webhook_rounds": job.webhook_rounds, "finished_at": job.finished_at}
    return store.update(job.id, FINISHED, where=where,
                        webhook_state=WEBHOOK_SENT if sent else WEBHOOK_FAILED,
                        webhook_until=0.0)


def check_list_args(payload_match: Mapping[str, str] | None, offset: int, limit: int) -> None:
    """``list_jobs``'s arguments as both stores require them (ValueError otherwise)."""
    if offset < 0 or limit < 1:
        raise ValueError(f"offset must be >= 0 and limit >= 1, got {offset} and {limit}")
    for key, value in (payload_match or {}).items():
        if not PAYLOAD_KEY.fullmatch(key) or not isinstance(value, str):
            raise ValueError(f"payload_match needs plain names and string values: {key!r}")


def requeue_changes(job: Job, max_requeues: int = MAX_REQUEUES,
                    reason: str = INTERRUPTED_REASON) -> dict[str, Any]:
    """The update that puts an interrupted job back in the queue, or fails it past the cap.

    Only a job that started (``started_at``) spends its re-queue budget: one that was taken but
    still waited in an engine queue did nothing that could have killed its server, and a server
    takes more jobs than its engine runs at once, so restarts would otherwise fail jobs that
    never ran.
    """
    if job.started_at is None:
        return {"status": QUEUED, "worker_id": None}
    if job.requeues < max_requeues:
        return {"status": QUEUED, "started_at": None, "worker_id": None,
                "requeues": job.requeues + 1}
    return {"status": FAILED, "error": reason, "finished_at": time.time()}


def reclaim_jobs(store: TaskStore, running: Sequence[Job], max_requeues: int,
                 reason: str, dead: Collection[str] = ()) -> tuple[int, int]:
    """Apply :func:`requeue_changes` to each running job whose worker is dead."""
    requeued = failed = 0
    for job in running:
        if job.worker_id not in dead and store.worker_alive(job.worker_id):
            continue
        # Compare-and-set on the worker too: a job re-claimed and started elsewhere meanwhile
        # is not ours to touch.
        done = store.update(job.id, (RUNNING,), owner=job.worker_id,
                            **requeue_changes(job, max_requeues, reason))
        if done is None:
            continue
        if done.status == QUEUED:
            requeued += 1
        else:
            failed += 1
    return requeued, failed


def _safe_id(job_id: str) -> str:
    """Job ids are generated by us, but never let one escape the results folder."""
    return "".join(c for c in job_id if c.isalnum() or c in "-_") or "_"
