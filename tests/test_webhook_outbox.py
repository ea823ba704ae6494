"""The durable webhook outbox in the task stores: at-least-once delivery across server stops.

Store level (SQLite and Redis alike): the write that makes a job final makes its webhook
pending; one server at a time claims it (compare-and-set); a claim of a dead server, or one
past its lease, can be claimed again; rounds are bounded; the end of a delivery is recorded only
by its claimer; jobs stored before the outbox existed still decode.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

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
from tests.test_task_store_async import redis_store

DEADLINE_S = 120
HOOK = "http://127.0.0.1:9/hook"


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """``check()``'s first truthy value, polled until ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """Each task store, empty: SQLite in ``tmp_path``, Redis under a prefix of its own."""
    if request.param == "redis":
        with redis_store() as s:
            yield s
        return
    s = job_store(tmp_path / "data")
    s.open()
    try:
        yield s
    finally:
        s.close()


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


def test_redis_drops_stale_outbox_entries() -> None:
    with redis_store() as store:
        finished(store, "w")
        store.r.sadd(store._k("webhooks"), "ghost")
        assert pending_ids(store) == {"w"}
        assert store.r.smembers(store._k("webhooks")) == {b"w"}
        store.delete("w")
        assert store.r.smembers(store._k("webhooks")) == set()
