"""The durable webhook outbox: at-least-once delivery across server stops.

Store level (SQLite and Redis alike): the write that makes a job final makes its webhook
pending; one server at a time claims it (compare-and-set); a claim of a dead server, or one
past its lease, can be claimed again; rounds are bounded; the end of a delivery is recorded only
by its claimer; jobs stored before the outbox existed still decode. Over a real socket: a
server stopped while its webhook waits for a retry, and a job finished just before a crash,
both get their webhook delivered by the next server on the same data dir.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from gateway.jobs import job_store
from inference.tasks import (
    COMPLETED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    WEBHOOK_SENT,
    Job,
    claim_webhooks,
    settle_webhook,
    webhook_claim,
)
from tests import serving
from tests.fakes import WebhookReceiver
from tests.test_runpod import SlowRunner, slow_factory
from tests.test_task_store_async import redis_store, spoil_document

DEADLINE_S = 120
HOOK = "http://127.0.0.1:9/hook"
SMALL_INPUT = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """``check()``'s first truthy value, polled until ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def store(any_store: Any) -> Any:
    """Each task store, empty (conftest's ``any_store``)."""
    return any_store


def finished(store: Any, job_id: str, *, webhook: str | None = HOOK, status: str = COMPLETED,
             expires_in: float = 3600, scope: str = "s", payload: Any = None, **final: Any
             ) -> Job:
    """A job with ``webhook`` made final by a runner's compare-and-set, as the server does."""
    now = time.time()
    store.create(Job(id=job_id, dialect="runpod", scope=scope, payload=payload or {},
                     status=RUNNING,
                     created_at=now, expires_at=now + expires_in, webhook=webhook,
                     worker_id="runner"))
    job = store.update(job_id, (RUNNING,), owner="runner", status=status, finished_at=now,
                       **final)
    assert job is not None
    return job


def pending_ids(store: Any) -> set[str]:
    return {job.id for job in store.pending_webhooks()}


def test_the_final_write_makes_the_webhook_pending(store: Any) -> None:
    job = finished(store, "w")
    assert (job.webhook_state, job.webhook_owner, job.webhook_rounds) == (WEBHOOK_PENDING, None, 0)
    assert store.get("w").webhook_state == WEBHOOK_PENDING
    # Claimed in that same write (the runner sends at once): the claim is kept.
    mine = finished(store, "mine", **webhook_claim("runner", 60))
    assert (mine.webhook_state, mine.webhook_owner, mine.webhook_rounds) == (
        WEBHOOK_PENDING, "runner", 1)
    # No webhook, no outbox (claim fields given blindly, as a cancel does, are dropped).
    bare = finished(store, "bare", webhook=None, **webhook_claim("runner", 60))
    assert (bare.webhook_state, bare.webhook_owner) == (None, None)
    # A write that keeps the job final (a media copy) leaves the delivery as it is.
    again = store.update("w", None, media=["a.png"], media_at=1.0)
    assert again.webhook_state == WEBHOOK_PENDING
    assert pending_ids(store) == {"w", "mine"}


def test_one_claim_per_delivery_and_only_the_claimer_settles(store: Any) -> None:
    finished(store, "w")
    store.heartbeat("A", 60)
    store.heartbeat("B", 60)
    before = store.pending_webhooks()
    claimed, given_up = claim_webhooks(store, "A", 60)
    assert [j.id for j in claimed] == ["w"] and given_up == []
    assert (claimed[0].webhook_owner, claimed[0].webhook_rounds) == ("A", 1)
    # A live claim is not claimable...
    assert claim_webhooks(store, "B", 60) == ([], [])
    # ...and B, having read the delivery before A's claim, loses the compare-and-set.
    real = store.pending_webhooks
    store.pending_webhooks = lambda limit=500: before
    try:
        assert claim_webhooks(store, "B", 60) == ([], [])
    finally:
        store.pending_webhooks = real
    assert store.get("w").webhook_owner == "A"
    # Only the claimer records the end.
    assert settle_webhook(store, claimed[0], "B", True) is None
    assert store.get("w").webhook_state == WEBHOOK_PENDING
    done = settle_webhook(store, claimed[0], "A", True)
    assert done is not None and done.webhook_state == WEBHOOK_SENT
    assert pending_ids(store) == set()
    assert claim_webhooks(store, "B", 60) == ([], [])


def test_racing_claimers_claim_each_delivery_once(store: Any) -> None:
    for i in range(20):
        finished(store, f"w{i}")
    workers = [f"r{i}" for i in range(4)]
    for w in workers:
        store.heartbeat(w, 60)
    start = threading.Barrier(len(workers))
    results: dict[str, list[str]] = {}

    def claim(worker: str) -> None:
        start.wait()
        results[worker] = [j.id for j in claim_webhooks(store, worker, 60)[0]]

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    claims = [job_id for ids in results.values() for job_id in ids]
    assert sorted(claims) == sorted(f"w{i}" for i in range(20)), results
    for i in range(20):
        job = store.get(f"w{i}")
        assert job.webhook_rounds == 1 and job.webhook_owner in workers


def test_claims_of_dead_servers_and_past_their_lease_are_claimable_again(store: Any) -> None:
    finished(store, "dead")
    finished(store, "lease")
    store.heartbeat("B", 60)
    # "gone" never said it was alive (SQLite: another process; Redis: no heartbeat key).
    assert store.update("dead", FINISHED, **webhook_claim("gone", 3600)) is not None
    store.heartbeat("A", 60)
    lease = store.update("lease", FINISHED, **webhook_claim("A", 0.05))
    wait_for("the 0.05 s lease to pass", lambda: time.time() > lease.webhook_until)
    claimed, _ = claim_webhooks(store, "B", 60)
    assert {j.id: (j.webhook_owner, j.webhook_rounds) for j in claimed} == {
        "dead": ("B", 2), "lease": ("B", 2)}
    # The late end of A's lost claim is not recorded over B's.
    assert settle_webhook(store, lease, "A", False) is None
    assert store.get("lease").webhook_state == WEBHOOK_PENDING
    # A server restarted under a fixed id treats its previous run's claims as dead.
    assert claim_webhooks(store, "B", 60) == ([], [])
    claimed, _ = claim_webhooks(store, "B", 60, dead=("B",))
    assert sorted(j.id for j in claimed) == ["dead", "lease"]


def test_redis_claims_of_a_server_whose_heartbeat_expired_are_claimable() -> None:
    with redis_store() as store:
        finished(store, "w")
        store.heartbeat("A", 0.2)
        assert store.update("w", FINISHED, **webhook_claim("A", 3600)) is not None
        assert claim_webhooks(store, "B", 60) == ([], [])
        wait_for("A's heartbeat to expire", lambda: not store.worker_alive("A"))
        claimed, _ = claim_webhooks(store, "B", 60)
        assert [(j.id, j.webhook_owner) for j in claimed] == [("w", "B")]


def test_rounds_are_bounded_then_the_delivery_is_failed(store: Any) -> None:
    finished(store, "w")
    for round_ in (1, 2, 3):
        claimed, given_up = claim_webhooks(store, f"s{round_}", 60, max_rounds=3)
        assert [j.webhook_rounds for j in claimed] == [round_] and given_up == []
    claimed, given_up = claim_webhooks(store, "s4", 60, max_rounds=3)
    assert claimed == [] and [(j.id, j.webhook_state) for j in given_up] == [
        ("w", WEBHOOK_FAILED)]
    assert store.get("w").webhook_state == WEBHOOK_FAILED
    assert pending_ids(store) == set()


def test_expired_retried_and_other_dialects_deliveries_are_not_resumed(store: Any) -> None:
    finished(store, "expired", expires_in=0.05)
    finished(store, "retried", status=FAILED)
    finished(store, "other")
    wait_for("the job's expiry", lambda: store.get("expired") is None)
    retried = store.update("retried", (FAILED,), status=QUEUED, finished_at=None)
    assert (retried.webhook_state, retried.webhook_owner) == (None, None)
    assert pending_ids(store) == {"other"}
    assert claim_webhooks(store, "A", 60, dialects=("modelslab",)) == ([], [])
    # The retried job's next outcome has a delivery of its own.
    store.update("retried", (QUEUED,), status=RUNNING, worker_id="runner")
    again = store.update("retried", (RUNNING,), status=COMPLETED, finished_at=time.time())
    assert again.webhook_state == WEBHOOK_PENDING
    store.delete("other")
    assert pending_ids(store) == {"retried"}


def test_jobs_stored_without_the_outbox_fields_still_decode(store: Any) -> None:
    now = time.time()
    old = msgspec.to_builtins(Job(id="old", dialect="runpod", scope="s", payload={},
                                  status=RUNNING, created_at=now, expires_at=now + 3600,
                                  webhook=HOOK, worker_id="runner"))
    for key in [k for k in old if k.startswith("webhook_")]:
        del old[key]
    raw = json.dumps(old).encode()
    if hasattr(store, "conn"):
        store.conn.execute(
            "INSERT INTO jobs (id, dialect, scope, status, created_at, expires_at, retries, doc)"
            " VALUES ('old', 'runpod', 's', ?, ?, ?, 0, ?)", (RUNNING, now, now + 3600, raw))
    else:
        store.create(msgspec.json.decode(raw, type=Job))
        store.r.set(store._k("job", "old"), raw)
    job = store.get("old")
    assert job is not None and (job.webhook_state, job.webhook_rounds) == (None, 0)
    done = store.update("old", (RUNNING,), owner="runner", status=COMPLETED, finished_at=now)
    assert done.webhook_state == WEBHOOK_PENDING
    assert pending_ids(store) == {"old"}


def test_a_sqlite_store_made_before_the_outbox_gains_its_column(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "data" / "tasks.sqlite3"
    path.parent.mkdir(parents=True)
    now = time.time()
    job = Job(id="old", dialect="runpod", scope="s", payload={}, status=RUNNING, created_at=now,
              expires_at=now + 3600, webhook=HOOK, worker_id="runner")
    with sqlite3.connect(path) as conn:  # the schema of the last release, without the column
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, dialect TEXT NOT NULL, scope TEXT "
                     "NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL "
                     "NOT NULL, retries INTEGER NOT NULL DEFAULT 0, doc BLOB NOT NULL)")
        conn.execute("INSERT INTO jobs VALUES ('old', 'runpod', 's', ?, ?, ?, 0, ?)",
                     (RUNNING, now, now + 3600, msgspec.json.encode(job)))
    store = job_store(tmp_path / "data")
    store.open()
    try:
        done = store.update("old", (RUNNING,), owner="runner", status=COMPLETED, finished_at=now)
        assert done.webhook_state == WEBHOOK_PENDING
        assert pending_ids(store) == {"old"}
        plan = " ".join(str(row) for row in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT id, dialect, webhook_owner, webhook_until, webhook_rounds, "
            "expires_at FROM jobs WHERE webhook_state = 'pending' AND expires_at > 0 "
            "ORDER BY webhook_until"))
        assert "COVERING INDEX jobs_webhook_heads" in plan, plan
    finally:
        store.close()


def test_a_sqlite_store_with_only_the_state_column_gains_the_claim_columns(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "data" / "tasks.sqlite3"
    path.parent.mkdir(parents=True)
    now = time.time()
    job = Job(id="claimed", dialect="runpod", scope="s", payload={}, status=COMPLETED,
              created_at=now, expires_at=now + 3600, finished_at=now, webhook=HOOK,
              webhook_state=WEBHOOK_PENDING, webhook_owner="gone", webhook_until=now + 60,
              webhook_rounds=2)
    with sqlite3.connect(path) as conn:  # the release with the outbox's state column only
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, dialect TEXT NOT NULL, scope TEXT "
                     "NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL "
                     "NOT NULL, retries INTEGER NOT NULL DEFAULT 0, doc BLOB NOT NULL, "
                     "webhook_state TEXT)")
        conn.execute("INSERT INTO jobs VALUES ('claimed', 'runpod', 's', ?, ?, ?, 0, ?, ?)",
                     (COMPLETED, now, now + 3600, msgspec.json.encode(job), WEBHOOK_PENDING))
    store = job_store(tmp_path / "data")
    store.open()
    try:
        [head] = store.pending_webhooks()
        assert (head.id, head.owner, head.until, head.rounds) == ("claimed", "gone", now + 60, 2)
        claimed, _ = claim_webhooks(store, "B", 60)
        assert [(j.id, j.webhook_owner, j.webhook_rounds) for j in claimed] == [
            ("claimed", "B", 3)]
    finally:
        store.close()


def test_looking_for_deliveries_to_resume_reads_no_job_document(store: Any) -> None:
    # A job's payload can be a 20 MB data URL, and a receiver that is down keeps many
    # deliveries pending: the periodic look must not read (and parse) every one of them.
    store.heartbeat("A", 60)
    store.heartbeat("B", 60)
    for i in range(3):
        job = finished(store, f"busy{i}", payload={"input": {"image": "x" * 10_000}},
                       **webhook_claim("A", 60))
        assert job.webhook_owner == "A"
        spoil_document(store, f"busy{i}")
    finished(store, "free")
    heads = store.pending_webhooks()
    assert heads[0].id == "free", heads  # unclaimed (until 0) first
    assert {h.id: (h.owner, h.rounds) for h in heads} == {
        "free": (None, 0), **{f"busy{i}": ("A", 1) for i in range(3)}}
    assert all(h.dialect == "runpod" and h.expires_at > time.time() for h in heads)
    # B reads only the one delivery it can claim; A's live claims stay A's.
    claimed, given_up = claim_webhooks(store, "B", 60)
    assert [(j.id, j.webhook_owner) for j in claimed] == [("free", "B")] and given_up == []
    assert {h.id: h.owner for h in store.pending_webhooks()}["free"] == "B"


def test_redis_reads_a_delivery_indexed_without_its_head_from_its_job() -> None:
    # An entry an older server wrote (the set only): read from the job, claimed as before.
    with redis_store() as store:
        finished(store, "w")
        store.r.hdel(store._k("webhook_heads"), "w")
        assert [(h.id, h.owner) for h in store.pending_webhooks()] == [("w", None)]
        claimed, _ = claim_webhooks(store, "B", 60)
        assert [j.id for j in claimed] == ["w"]
        assert [(h.id, h.owner) for h in store.pending_webhooks()] == [("w", "B")]
        settle_webhook(store, claimed[0], "B", True)
        assert store.pending_webhooks() == []
        assert store.r.hlen(store._k("webhook_heads")) == 0


def test_redis_drops_stale_outbox_entries() -> None:
    with redis_store() as store:
        finished(store, "w")
        store.r.sadd(store._k("webhooks"), "ghost")
        assert pending_ids(store) == {"w"}
        assert store.r.smembers(store._k("webhooks")) == {b"w"}
        store.delete("w")
        assert store.r.smembers(store._k("webhooks")) == set()
        assert store.r.hlen(store._k("webhook_heads")) == 0
        # A head whose entry an older server removed alone (it knows no heads) is deleted.
        finished(store, "settled-by-old")
        store.r.srem(store._k("webhooks"), "settled-by-old")
        assert pending_ids(store) == set()
        assert store.r.hlen(store._k("webhook_heads")) == 0
        # A pending delivery whose job key is gone (evicted, or no sweep for an hour past its
        # expiry) leaves the outbox with the sweep.
        gone = finished(store, "vanished", expires_in=0.05)
        store.r.delete(store._k("job", "vanished"))
        wait_for("the job's expiry", lambda: time.time() > gone.expires_at)
        assert store.expired() == []
        assert store.r.smembers(store._k("webhooks")) == set()
        assert store.r.hlen(store._k("webhook_heads")) == 0


async def test_a_body_that_fails_to_render_is_left_to_the_outbox(
        caplog: pytest.LogCaptureFixture) -> None:
    # A disk or store fault while rendering (ModelsLab copies images to /media): logged, not
    # settled (the outbox sends it again once the claim runs out), and no orphaned exception.
    from gateway.fetch import FetchPolicy
    from gateway.webhooks import WebhookSender

    settled: list[bool] = []

    async def render() -> bytes:
        raise OSError(28, "No space left on device")

    async def settle(arrived: bool) -> None:
        settled.append(arrived)

    caplog.set_level(logging.WARNING, logger="gateway.webhooks")
    sender = WebhookSender(FetchPolicy(), retries=0)
    task = sender.send_rendered("http://127.0.0.1:9/hook?token=secret", render, settle)
    assert await task is False
    assert settled == []
    [record] = [r for r in caplog.records if r.name == "gateway.webhooks"]
    message = record.getMessage()
    assert "could not render" in message and "No space left" in message, message
    assert "secret" not in message
    await sender.close()


async def test_an_attempt_that_fails_unexpectedly_is_a_failed_attempt(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Not a dead task that leaves the delivery pending until the outbox abandons it: settled
    # as not arrived (failed), after its retries, with the traceback logged.
    from gateway import webhooks
    from gateway.fetch import FetchPolicy

    calls: list[str] = []

    async def broken(url: str, body: bytes, policy: FetchPolicy) -> int:
        calls.append(url)
        raise ValueError("a bug in the delivery path")

    async def render() -> bytes:
        return b"{}"

    settled: list[bool] = []

    async def settle(arrived: bool) -> None:
        settled.append(arrived)

    monkeypatch.setattr(webhooks, "post_json", broken)
    caplog.set_level(logging.WARNING, logger="gateway.webhooks")
    sender = webhooks.WebhookSender(FetchPolicy(), retries=1, retry_delay_s=0)
    assert await sender.send_rendered("http://8.8.8.8/hook", render, settle) is False
    assert settled == [False] and len(calls) == 2
    assert any(r.exc_info and "a bug in the delivery path" in str(r.exc_info[1])
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    await sender.close()


# -- over a real socket: the next server delivers -----------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(refusing=True)
    yield r
    r.close()


def _outbox_server(tmp_path: Any, retry_delay_s: float) -> Any:
    """A server whose webhooks may go to the loopback receiver, retried ``retry_delay_s`` apart."""
    return serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                               webhook_allow="127.0.0.1", webhook_retry_delay_s=retry_delay_s,
                               webhook_timeout_s=5)


def _run_with_webhook(live: serving.LiveServer, receiver: WebhookReceiver) -> str:
    """Submit a small RunPod job whose webhook goes to ``receiver``; its id."""
    r = httpx.post(f"{live.url}/v2/ep/run", json={"input": SMALL_INPUT, "webhook": receiver.url},
                   timeout=DEADLINE_S)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_the_next_server_delivers_what_a_stopped_server_left_pending(
        tmp_path: Any, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    # A retry an hour away: only the next server can deliver this webhook.
    with _outbox_server(tmp_path, 3600) as live:
        job_id = _run_with_webhook(live, receiver)
        wait_for("the first (refused) webhook attempt", lambda: receiver.posts_for(job_id))
        store = live.app.state.ctx.jobs.store
        job = store.get(job_id)
        assert job.status == COMPLETED and job.webhook_state == WEBHOOK_PENDING, job
        assert job.webhook_owner == live.app.state.ctx.jobs.worker_id
        # At the stop, deliveries are cut off before the store closes (one finishing later
        # would record its end in a closed store).
        runner = live.app.state.ctx.jobs
        sender = runner.handlers["runpod"].tasks.webhooks
        closed: list[str] = []
        for name, obj in (("deliveries", sender), ("store", runner.db)):
            real_close = obj.close

            async def close(real_close: Any = real_close, name: str = name) -> None:
                closed.append(name)
                await real_close()

            obj.close = close
    assert len(receiver.posts_for(job_id)) == 1
    assert closed == ["deliveries", "store"], closed
    assert not sender._tasks, "a webhook delivery outlived its server's stop"
    # A job whose final write landed just before a crash: pending, its delivery never started.
    store = job_store(tmp_path / "data")
    store.open()
    try:
        crashed = finished(store, "crashed", webhook=receiver.url, status=FAILED,
                           scope="anonymous/ep", payload={"input": SMALL_INPUT}, error="boom",
                           **webhook_claim("crashed-server", 3600))
        assert crashed.webhook_state == WEBHOOK_PENDING
        assert store.get(job_id).webhook_state == WEBHOOK_PENDING
    finally:
        store.close()
    receiver.refusing = False
    caplog.set_level(logging.WARNING, logger="gateway.outbox")
    with _outbox_server(tmp_path, 3600) as live:
        posts = wait_for("the resumed webhook of the stopped server's job",
                         lambda: receiver.posts_for(job_id)[1:])
        assert posts[0]["status"] == "COMPLETED" and posts[0]["output"]["images"], posts
        crash_posts = wait_for("the webhook of the job finished before a crash",
                               lambda: receiver.posts_for("crashed"))
        assert crash_posts[0]["status"] == "FAILED" and crash_posts[0]["error"] == "boom"
        store = live.app.state.ctx.jobs.store
        for done in (job_id, "crashed"):
            wait_for(f"job {done}'s delivery recorded as sent",
                     lambda d=done: store.get(d).webhook_state == WEBHOOK_SENT)
        assert live.metric("imagegate_webhook_deliveries_total",
                           {"dialect": "runpod", "outcome": "sent"}) == 2
        assert any("resuming 2 pending webhook deliveries left by a stopped server"
                   in rec.getMessage() for rec in caplog.records), caplog.text
    # Sent once each by the second server: not again by a third.
    with _outbox_server(tmp_path, 3600) as live:
        assert live.app.state.ctx.jobs.store.pending_webhooks() == []
    assert len(receiver.posts_for(job_id)) == 2 and len(receiver.posts_for("crashed")) == 1


def test_a_delivery_whose_every_attempt_failed_is_failed_and_not_resent(
        tmp_path: Any, receiver: WebhookReceiver) -> None:
    with _outbox_server(tmp_path, 0.05) as live:
        job_id = _run_with_webhook(live, receiver)
        store = live.app.state.ctx.jobs.store
        wait_for("the delivery recorded as failed after its 3 refused attempts",
                 lambda: store.get(job_id).webhook_state == WEBHOOK_FAILED)
        assert len(receiver.posts_for(job_id)) == 3
        assert live.metric("imagegate_webhook_deliveries_total",
                           {"dialect": "runpod", "outcome": "failed"}) == 1
        assert store.pending_webhooks() == []
    receiver.refusing = False
    with _outbox_server(tmp_path, 0.05) as live:
        assert live.app.state.ctx.jobs.store.get(job_id).webhook_state == WEBHOOK_FAILED
    assert len(receiver.posts_for(job_id)) == 3


def test_a_replica_resumes_deliveries_of_dead_replicas_but_not_of_live_ones(
        tmp_path: Any, receiver: WebhookReceiver) -> None:
    """Redis: the sweep loop (not only the start) claims what a dead replica left pending."""
    receiver.refusing = False
    with redis_store() as store:
        redis_url = f"redis://127.0.0.1:6379/{store.r.connection_pool.connection_kwargs['db']}"
        with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                                 redis_url=redis_url, redis_prefix=store.prefix,
                                 webhook_allow="127.0.0.1", job_sweep_interval_s=0.2) as live:
            extra = {"scope": "anonymous/ep", "payload": {"input": {"prompt": "x"}},
                     "status": FAILED, "error": "boom", "webhook": receiver.url}
            # Written after the server started: only its sweep loop can find them.
            store.heartbeat("alive", 600)
            finished(store, "busy", **extra, **webhook_claim("alive", 3600))
            finished(store, "orphan", **extra, **webhook_claim("dead-replica", 3600))
            posts = wait_for("the dead replica's webhook, resumed by the sweep loop",
                             lambda: receiver.posts_for("orphan"))
            assert posts[0]["status"] == "FAILED" and posts[0]["error"] == "boom"
            wait_for("the resumed delivery recorded as sent",
                     lambda: store.get("orphan").webhook_state == WEBHOOK_SENT)
            assert store.get("orphan").webhook_owner == live.app.state.ctx.jobs.worker_id
            busy = store.get("busy")
            assert (busy.webhook_state, busy.webhook_owner) == (WEBHOOK_PENDING, "alive")
            assert receiver.posts_for("busy") == []


def test_a_final_write_held_up_by_an_outage_lands_with_a_fresh_claim(
        tmp_path: Any, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim in the final write is made when the write lands, not when it was first tried:
    else a write held up past the lease would land already claimable, and be sent twice."""
    import sqlite3

    receiver.refusing = False
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                             webhook_allow="127.0.0.1") as live:
        runner = live.app.state.ctx.jobs
        runner.outbox.lease_s = 0.3
        real = runner.store.update
        landed: list[float] = []
        refusals = [0]

        def update(job_id: str, expect: Any = None, **kw: Any) -> Any:
            if kw.get("status") == COMPLETED and refusals[0] < 3:
                refusals[0] += 1  # about 1.5 s of retries: five times the lease
                raise sqlite3.OperationalError("database is locked")
            job = real(job_id, expect, **kw)
            if kw.get("status") == COMPLETED:
                landed.append(time.time())
            return job

        monkeypatch.setattr(runner.store, "update", update)
        job_id = _run_with_webhook(live, receiver)
        wait_for("the final write, after the outage", lambda: landed)
        job = runner.store.get(job_id)
        assert refusals[0] == 3
        assert job.webhook_until > landed[0], (job.webhook_until, landed[0])
        wait_for("the webhook", lambda: receiver.posts_for(job_id))
