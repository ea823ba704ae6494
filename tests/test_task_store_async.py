"""The task store never runs on the event loop: a stuck store call leaves the server answering."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from gateway import app as app_module
from gateway.jobs import job_store
from gateway.task_store_async import AsyncTaskStore
from inference import Engine, ModelInfo
from inference.tasks import Job
from tests import fakes, serving

# Generous: the CI machine has two busy cores; nothing here waits this long when it works.
DEADLINE_S = 60


class GatedStore:
    """The real SQLite store, except that the calls named in ``gated`` wait for ``gate``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gated: set[str] = set()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []
        self.names: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            self.names.append(name)
            if name in self.gated:
                self.entered.set()
                assert self.gate.wait(DEADLINE_S * 2), "the test never opened the gate"
            return attr(*args, **kwargs)

        return call


class RefinerRunner(fakes.FakeRunner):
    """worker-sdxl always runs the refiner: a fake model that has one."""

    has_refiner = True


def refiner_engine(runner: RefinerRunner) -> Any:
    info = ModelInfo(id="fake", source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=True, created=0)

    def build(settings: Any, metrics: Any) -> Engine:
        return Engine(settings.engine_config(), metrics, runner_factory=lambda _c: (runner, info))

    return build


@pytest.fixture
def gated_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[tuple[serving.LiveServer, GatedStore]]:
    holder: dict[str, GatedStore] = {}
    real = app_module.build_stores

    def build(settings: Any) -> Any:
        stores = real(settings)
        stores.tasks = holder["store"] = GatedStore(stores.tasks)
        return stores

    monkeypatch.setattr(app_module, "build_stores", build)
    with serving.live_server(tmp_path, engine_factory=refiner_engine(RefinerRunner())) as live:
        yield live, holder["store"]


def test_health_and_other_jobs_answer_while_a_store_call_is_stuck(
        gated_server: tuple[serving.LiveServer, GatedStore]) -> None:
    live, store = gated_server
    url = f"{live.url}/v2/ep"
    store.gated.add("get")
    stuck: dict[str, httpx.Response] = {}

    def poll() -> None:
        stuck["response"] = httpx.get(f"{url}/status/no-such-job", timeout=DEADLINE_S * 2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        assert store.entered.wait(DEADLINE_S), "the status request never reached the store"
        # The status request now holds a store thread; the event loop must not be in it.
        health = httpx.get(f"{live.url}/health", timeout=DEADLINE_S)
        assert health.status_code == 200
        assert httpx.get(f"{live.url}/ready", timeout=DEADLINE_S).status_code == 200
        # Other store calls (admission count, insert) go on in other threads.
        job = httpx.post(f"{url}/run", json={"input": {"prompt": "x", "width": 64, "height": 64,
                                                       "refiner_inference_steps": 4}},
                         timeout=DEADLINE_S).json()
        assert job["status"] == "IN_QUEUE"
        assert poller.is_alive() and "response" not in stuck
    finally:
        store.gate.set()
    poller.join(DEADLINE_S)
    assert stuck["response"].status_code == 404
    store.gated.clear()
    done = httpx.post(f"{url}/runsync", json={"input": {"prompt": "y", "width": 64, "height": 64,
                                                        "refiner_inference_steps": 4}},
                      timeout=DEADLINE_S * 2).json()
    assert done["status"] == "COMPLETED", done.get("error")
    assert httpx.get(f"{url}/status/{job['id']}", timeout=DEADLINE_S).json()["status"] in (
        "IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    # Every store call of the running server ran on the store's own threads.
    assert store.threads and all(t.startswith(("imagegate-tasks", "imagegate-heartbeat"))
                                 for t in store.threads), sorted(set(store.threads))


async def test_heartbeat_and_other_calls_go_on_while_task_lists_are_slow(tmp_path: Any) -> None:
    """A replica's heartbeat never waits behind other store calls (it would look dead and its
    jobs would be re-run elsewhere), and slow task lists take one worker thread at most."""
    gated = GatedStore(job_store(tmp_path / "data"))
    store = AsyncTaskStore(gated, workers=2)
    await store.open()
    lists = [asyncio.create_task(store.list_jobs("d", "s")) for _ in range(3)]
    try:
        gated.gated.add("list_jobs")
        gated.gated.add("get")
        stuck_get = asyncio.create_task(store.get("a"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while gated.names.count("list_jobs") < 1 or "get" not in gated.names:
            assert loop.time() < deadline, f"calls never reached the store: {gated.names}"
            await asyncio.sleep(0.01)
        # Both worker threads are held (one list, one get): the heartbeat still lands.
        await asyncio.wait_for(store.heartbeat("w", 10.0), DEADLINE_S)
        assert gated.names.count("list_jobs") == 1, "a second list took another thread"
    finally:
        gated.gate.set()
    assert [await t for t in lists] == [([], 0)] * 3
    assert await stuck_get is None
    await store.close()


async def test_async_store_runs_calls_off_the_loop_thread(tmp_path: Any) -> None:
    store = AsyncTaskStore(job_store(tmp_path / "data"), workers=2)
    await store.open()
    try:
        await store.create(Job(id="a", dialect="d", scope="s", payload={}, created_at=1.0,
                               expires_at=4e9))
        job = await store.update("a", ("queued",), status="running", worker_id="w")
        assert job is not None and job.status == "running"
        assert (await store.get("a")) == job
        assert await store.count(("running",)) == 1
        stored = await store.save_images("a", [(b"png-bytes", "image/png", 7, 8, 8)])
        assert await store.read_images("a", stored) == [b"png-bytes"]
        seen: list[str] = []
        await store._call(lambda: seen.append(threading.current_thread().name))
        assert seen[0].startswith("imagegate-tasks")
    finally:
        await store.close()
    # Closed and reopened: a fresh pool, the same file.
    await store.open()
    try:
        assert (await store.get("a")) is not None
    finally:
        await store.close()


def spoil_document(store: Any, job_id: str) -> None:
    """Make ``job_id``'s stored document unreadable (either store): any read of it now raises."""
    if hasattr(store, "conn"):
        store.conn.execute("UPDATE jobs SET doc = x'00' WHERE id = ?", (job_id,))
    else:
        store.r.set(store._k("job", job_id), b"\x00", keepttl=True)


@contextmanager
def redis_store() -> Iterator[Any]:
    """A Redis task store under a key prefix of its own (database 7), deleted afterwards."""
    redis = pytest.importorskip("redis")
    import uuid

    from inference.tasks_redis import RedisTaskStore

    store = RedisTaskStore("redis://127.0.0.1:6379/7", f"imagegate-test-{uuid.uuid4().hex[:12]}")
    try:
        store.open()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis: {exc}")
    try:
        yield store
    finally:
        keys = list(store.r.scan_iter(match=f"{store.prefix}:*"))
        if keys:
            store.r.delete(*keys)
        store.close()


def test_redis_images_expire_with_the_job_without_reading_it_back() -> None:
    import time

    from inference.tasks_redis import GRACE_S

    with redis_store() as store:
        expires_at = time.time() + 600
        # No job record exists: the expiry can only come from the argument.
        stored = store.save_images("j", [(b"x", "image/png", 1, 8, 8)], expires_at=expires_at)
        assert [s.file for s in stored] == ["0.png"]
        ttl_s = store.r.pttl(store._k("img", "j", "0")) / 1000
        assert 600 + GRACE_S - 60 < ttl_s <= 600 + GRACE_S
        assert store.read_image("j", stored[0]) == b"x"


def test_list_jobs_newest_first_filtered_and_paged(any_store: Any) -> None:
    import time

    now = time.time()
    far = now + 3600

    def add(job_id: str, created: float, status: str = "queued", *, scope: str = "s",
            dialect: str = "d", model: str = "m1", expires: float = far) -> None:
        any_store.create(Job(id=job_id, dialect=dialect, scope=scope, status=status,
                             payload={"model": model, "n": 1}, created_at=created,
                             expires_at=expires))

    add("j1", now - 50, "completed")
    add("j2", now - 40, "failed", model="m2")
    add("j3", now - 30)
    add("j4a", now - 20, "running")
    add("j4b", now - 20)  # same second as j4a: the id breaks the tie
    add("j5", now - 10, "completed", model="m2")
    add("other-scope", now - 5, scope="t")
    add("other-dialect", now - 5, dialect="e")
    add("expired", now - 5, expires=now - 1)
    # A status changed after creation is what the filter sees.
    assert any_store.update("j3", ("queued",), status="cancelled") is not None

    def ids(**kw: Any) -> tuple[list[str], int]:
        jobs, total = any_store.list_jobs("d", "s", **kw)
        return [j.id for j in jobs], total

    everything = ["j5", "j4b", "j4a", "j3", "j2", "j1"]
    assert ids() == (everything, 6)
    assert ids(offset=0, limit=4) == (everything[:4], 6)
    assert ids(offset=4, limit=4) == (everything[4:], 6)
    assert ids(offset=6, limit=4) == ([], 6)
    assert ids(statuses=("completed",)) == (["j5", "j1"], 2)
    assert ids(statuses=("queued", "running")) == (["j4b", "j4a"], 2)
    assert ids(statuses=()) == ([], 0)
    assert ids(since=now - 40, until=now - 20) == (["j3", "j2"], 2)  # since in, until out
    assert ids(payload_match={"model": "m2"}) == (["j5", "j2"], 2)
    assert ids(payload_match={"model": "m2"}, statuses=("failed",), limit=1) == (["j2"], 1)
    assert ids(payload_match={"model": "none"}) == ([], 0)
    assert ids(payload_match={"n": "1"}) == ([], 0)  # strings match strings only
    assert any_store.list_jobs("d", "nobody") == ([], 0)
    assert [j.id for j in any_store.list_jobs("d", "t")[0]] == ["other-scope"]
    for bad in ({"offset": -1}, {"limit": 0}, {"payload_match": {"a.b": "x"}},
                {"payload_match": {"model": 1}}):
        with pytest.raises(ValueError):
            any_store.list_jobs("d", "s", **bad)


async def test_async_store_lists_jobs(tmp_path: Any) -> None:
    store = AsyncTaskStore(job_store(tmp_path / "data"), workers=1)
    await store.open()
    try:
        for i in range(3):
            await store.create(Job(id=f"a{i}", dialect="d", scope="s", payload={},
                                   created_at=float(i + 1), expires_at=4e9))
        jobs, total = await store.list_jobs("d", "s", offset=1, limit=1)
        assert ([j.id for j in jobs], total) == (["a1"], 3)
    finally:
        await store.close()


def test_update_compares_the_fields_it_is_given(any_store: Any) -> None:
    """``where``: the compare-and-set a retry uses, so a concurrent retry's count is not lost."""
    any_store.create(Job(id="r", dialect="d", scope="s", payload={}, status="failed",
                         created_at=1.0, expires_at=4e9, retries=1))
    assert any_store.update("r", ("failed",), where={"retries": 0}, status="queued") is None
    assert any_store.get("r").status == "failed"
    done = any_store.update("r", ("failed",), where={"retries": 1}, status="queued", retries=2)
    assert done is not None and (done.status, done.retries) == ("queued", 2)
    assert any_store.get("r").retries == 2


def test_redis_lists_read_one_page_and_index_older_jobs() -> None:
    """Unfiltered Redis task lists read only their page's jobs; jobs stored before the time index
    existed are indexed on the first list; a retried job (new creation time) moves up."""
    import time

    with redis_store() as store:
        now = time.time()
        for i in range(30):
            store.create(Job(id=f"j{i:02d}", dialect="d", scope="s", payload={},
                             created_at=now - 100 + i, expires_at=now + 3600))
        # As a job stored by an older version leaves it: in the scope set only.
        store.r.zrem(store._time_key("d", "s"), "j05")
        fetched: list[int] = []
        real_mget = store.r.mget

        def counting_mget(keys: Any, *args: Any) -> Any:
            fetched.append(len(keys))
            return real_mget(keys, *args)

        store.r.mget = counting_mget
        jobs, total = store.list_jobs("d", "s", offset=2, limit=3)
        assert [j.id for j in jobs] == ["j27", "j26", "j25"] and total == 30
        assert fetched[-1] == 3, f"read {fetched} jobs for a page of 3"
        jobs, total = store.list_jobs("d", "s", offset=24, limit=10)
        assert [j.id for j in jobs][-1] == "j00" and "j05" in [j.id for j in jobs]
        assert total == 30
        assert store.update("j05", where={"retries": 0}, created_at=now + 10, retries=1)
        assert [j.id for j in store.list_jobs("d", "s", limit=1)[0]] == ["j05"]


def test_a_taken_job_not_started_counts_and_lists_as_queued(any_store: Any) -> None:
    """Counts and status filters go by what clients see: ``running`` with no start is queued."""
    for job_id, status, started in (("waiting", "running", None), ("going", "running", 5.0),
                                    ("stored", "queued", None), ("done", "completed", 5.0)):
        any_store.create(Job(id=job_id, dialect="d", scope="s", payload={}, status=status,
                             created_at=float(len(job_id)), started_at=started,
                             expires_at=4e9, worker_id="w" if status == "running" else None))
    stats = any_store.stats("d", "s")
    assert (stats["queued"], stats["running"], stats["completed"]) == (2, 1, 1), stats

    def ids(*statuses: str) -> set[str]:
        return {j.id for j in any_store.list_jobs("d", "s", statuses=statuses)[0]}

    assert ids("queued") == {"waiting", "stored"}
    assert ids("running") == {"going"}
    # Once the engine starts it, the stored start moves it over.
    assert any_store.update("waiting", ("running",), started_at=6.0) is not None
    assert ids("running") == {"going", "waiting"} and any_store.stats("d", "s")["running"] == 2


def test_reclaim_requeues_a_job_that_never_started_without_spending_its_budget(
        any_store: Any) -> None:
    """After a crash (kill -9): only a job that started counts the interruption."""
    import time

    from inference.tasks import FAILED, QUEUED, RUNNING

    now = time.time()
    for name, started in (("waited", None), ("ran", now - 1)):
        any_store.create(Job(id=name, dialect="runpod", scope="s", payload={}, status=RUNNING,
                             created_at=now, expires_at=now + 60, worker_id="gone",
                             requeues=1, started_at=started))
    assert any_store.reclaim(dead=("gone",)) == (1, 1)
    waited, ran = any_store.get("waited"), any_store.get("ran")
    assert (waited.status, waited.requeues, waited.worker_id) == (QUEUED, 1, None)
    assert ran.status == FAILED and "re-queued once" in ran.error


def test_redis_keeps_an_index_entry_for_a_job_that_came_back_to_its_status() -> None:
    """queued() reads a job as taken; before it drops the entry as stale, another replica
    re-queues the job. The drop checks the job again inside Redis, so the entry stays."""
    with redis_store() as store:
        store.create(Job(id="j", dialect="d", scope="s", payload={}, created_at=1.0,
                         expires_at=4e9))
        assert store.update("j", ("queued",), status="running", worker_id="w") is not None
        stale = store._jobs(["j"])  # what queued() reads: taken
        assert store.update("j", ("running",), status="queued", worker_id=None) is not None
        real_jobs = store._jobs
        store._jobs = lambda ids: stale  # the read happened before the re-queue
        try:
            assert store.queued(10) == []
        finally:
            store._jobs = real_jobs
        assert [j.id for j in store.queued(10)] == ["j"], "a re-queued job lost its entry"
        store.r.zadd(store._k("queued"), {"ghost": 1.0})  # a really stale entry still goes
        store.queued(10)
        assert store.r.zscore(store._k("queued"), "ghost") is None


def test_active_counts_are_by_dialect_and_stored_status_in_one_pass(any_store: Any) -> None:
    """What ``imagegate_jobs`` shows: queued and running (as stored), unexpired, per dialect."""
    for job_id, dialect, status, expires in (("a", "x", "queued", 4e9), ("b", "x", "running", 4e9),
                                            ("c", "x", "running", 4e9), ("d", "y", "queued", 4e9),
                                            ("e", "y", "completed", 4e9), ("f", "y", "queued", 1.0)):
        any_store.create(Job(id=job_id, dialect=dialect, scope="s", payload={}, status=status,
                             created_at=1.0, expires_at=expires,
                             worker_id="w" if status == "running" else None))
    assert any_store.active_counts() == {("x", "queued"): 1, ("x", "running"): 2,
                                         ("y", "queued"): 1}


def _scope_of_every_kind(store: Any) -> dict[str, int]:
    """Jobs of one scope in every state, finished ones with large payloads; their stats."""
    import time

    from inference.tasks import COMPLETED, FAILED, QUEUED, RUNNING

    now = time.time()
    for i, (job_id, status, started, retries) in enumerate((
            ("q1", QUEUED, None, 0), ("q2", QUEUED, None, 1), ("taken", RUNNING, None, 0),
            ("going", RUNNING, now, 0), ("c1", COMPLETED, now, 0), ("c2", COMPLETED, now, 1),
            ("f1", FAILED, now, 0))):
        store.create(Job(id=job_id, dialect="runpod", scope="s", status=status,
                         payload={"input": {"image": "x" * 10_000}}, created_at=now + i,
                         started_at=started, retries=retries, expires_at=now + 3600,
                         worker_id="w" if status == RUNNING else None))
    return store.stats("runpod", "s")


def test_counts_lists_and_purges_read_no_finished_job_document(any_store: Any) -> None:
    """RunPod's /health, status-filtered task lists and a purge go by status, not documents.

    A finished job's payload can be a 20 MB data URL and a scope keeps its jobs for
    ``--job-ttl-s``: reading them all on every /health would move gigabytes.
    """
    from inference.tasks import COMPLETED, FAILED, QUEUED, RUNNING

    before = _scope_of_every_kind(any_store)
    assert {k: before[k] for k in (QUEUED, RUNNING, COMPLETED, FAILED, "retried")} == {
        QUEUED: 3, RUNNING: 1, COMPLETED: 2, FAILED: 1, "retried": 2}, before
    for job_id in ("c1", "c2", "f1"):
        spoil_document(any_store, job_id)
    assert any_store.stats("runpod", "s") == before
    assert any_store.count((COMPLETED, FAILED), "runpod", "s") == 3
    jobs, total = any_store.list_jobs("runpod", "s", statuses=(QUEUED,))
    assert ([j.id for j in jobs], total) == (["taken", "q2", "q1"], 3)
    assert sorted(any_store.purge_queued("runpod", "s")) == ["q1", "q2"]
    after = any_store.stats("runpod", "s")
    assert (after[QUEUED], after[RUNNING], after[COMPLETED]) == (1, 1, 2), after


def test_redis_scope_heads_defer_to_jobs_an_older_server_wrote_or_moved() -> None:
    """During a rolling upgrade older servers write jobs without heads, and move jobs on
    without touching them: counts read those jobs; heads nobody needs are dropped."""
    import time

    import msgspec

    from inference.tasks import COMPLETED, QUEUED

    with redis_store() as store:
        before = _scope_of_every_kind(store)
        heads = store._heads_key("runpod", "s")
        store.r.hdel(heads, "q1")  # stored by an older server: no head
        moved = msgspec.json.decode(store.r.get(store._k("job", "q2")), type=Job)
        moved.status, moved.started_at, moved.finished_at = COMPLETED, 1.0, 2.0
        store.r.set(store._k("job", "q2"), msgspec.json.encode(moved), keepttl=True)
        store.r.hset(heads, "ghost", b'{"status":"completed","expires_at":4e9}')
        stats = store.stats("runpod", "s")
        assert (stats[QUEUED], stats[COMPLETED]) == (before[QUEUED] - 1, before[COMPLETED] + 1)
        assert store.r.hget(heads, "ghost") is None, "a head with no job in the scope stayed"
        # A job whose key is gone for good (past its expiry and Redis's grace) leaves the scope.
        now = time.time()
        store.create(Job(id="long-gone", dialect="runpod", scope="s", payload={},
                         status=COMPLETED, created_at=now, expires_at=now - 2 * 3600))
        store.r.delete(store._k("job", "long-gone"))
        store.stats("runpod", "s")
        assert not store.r.sismember(store._scope_key("runpod", "s"), "long-gone")
        assert store.r.hget(heads, "long-gone") is None
        # Deleting a job drops its head with it.
        store.delete("c1")
        assert store.r.hget(heads, "c1") is None
        assert not store.r.exists(store._k("owner", "c1"))


def test_redis_sweep_drops_the_scope_entries_of_a_job_whose_key_is_gone() -> None:
    """Redis evicted a job's key, or no sweep ran within its grace: the sweep still knows its
    scope (``P:owner:<id>``) and drops it there, even if that scope is never read again."""
    import time

    from inference.tasks import COMPLETED
    from inference.tasks_redis import GRACE_S

    with redis_store() as store:
        now = time.time()
        for job_id in ("evicted", "kept"):
            store.create(Job(id=job_id, dialect="dashscope", scope="once", payload={},
                             status=COMPLETED, created_at=now, expires_at=now + 60))
        store.r.delete(store._k("job", "evicted"))
        assert [j.id for j in store.expired(now + 120)] == ["kept"]
        indexes = {
            "scope": store.r.sismember(store._scope_key("dashscope", "once"), "evicted"),
            "time": store.r.zscore(store._time_key("dashscope", "once"), "evicted"),
            "head": store.r.hget(store._heads_key("dashscope", "once"), "evicted"),
            "owner": store.r.exists(store._k("owner", "evicted")),
            "expiry": store.r.zscore(store._k("expiry"), "evicted"),
        }
        assert not any(indexes.values()), indexes
        assert store.r.sismember(store._scope_key("dashscope", "once"), "kept")
        # The owner key outlives the job key by a grace, and goes with the job. Absolute expiry
        # times: two PTTL reads a moment apart differ by that moment too (a CI run saw 1 ms).
        assert store.r.pexpiretime(store._k("owner", "kept")) - store.r.pexpiretime(
            store._k("job", "kept")) == GRACE_S * 1000
        store.delete("kept")
        assert not store.r.exists(store._k("owner", "kept"))
        assert not store.r.exists(store._scope_key("dashscope", "once"))


def test_redis_scope_heads_see_a_retry_by_an_older_server() -> None:
    """An older server retries a failed job: it rewrites the job and its creation time in the
    time index (as every version does), not the head; the new time gives the head away."""
    import time

    import msgspec

    from inference.tasks import FAILED, QUEUED

    with redis_store() as store:
        _scope_of_every_kind(store)
        old = msgspec.json.decode(store.r.get(store._k("job", "f1")), type=Job)
        assert old.status == FAILED
        retried = msgspec.structs.replace(old, status=QUEUED, created_at=time.time() + 60,
                                          retries=old.retries + 1, finished_at=None)
        store.r.set(store._k("job", "f1"), msgspec.json.encode(retried), keepttl=True)
        store.r.zadd(store._time_key("runpod", "s"), {"f1": retried.created_at})
        stats = store.stats("runpod", "s")
        assert (stats[QUEUED], stats[FAILED], stats["retried"]) == (4, 0, 3), stats
        jobs, total = store.list_jobs("runpod", "s", statuses=(QUEUED,))
        assert jobs[0].id == "f1" and total == 4
        assert "f1" in store.purge_queued("runpod", "s")


def test_redis_status_lists_check_the_page_against_the_jobs() -> None:
    """A job that moves on between the heads' read and the page's is not listed as it was."""
    from inference.tasks import QUEUED, RUNNING

    with redis_store() as store:
        _scope_of_every_kind(store)
        heads = store._heads("runpod", "s")
        assert store.update("q2", (QUEUED,), status=RUNNING, worker_id="w", started_at=1.0)
        store._heads = lambda _dialect, _scope: heads  # read before the move
        jobs, _total = store.list_jobs("runpod", "s", statuses=(QUEUED,))
        assert [j.id for j in jobs] == ["taken", "q1"]


def test_retries_and_cancels_move_counts_lists_and_purges(any_store: Any) -> None:
    """What a job's own updates do to the scope's counts (Redis: its head moves with it)."""
    import time

    from inference.tasks import CANCELLED, FAILED, QUEUED

    before = _scope_of_every_kind(any_store)
    assert any_store.update("f1", (FAILED,), where={"retries": 0}, status=QUEUED,
                            created_at=time.time() + 60, retries=1, finished_at=None)
    assert any_store.update("q1", (QUEUED,), status=CANCELLED, finished_at=time.time())
    spoil_document(any_store, "q1")  # finished by that update: not to be read again
    stats = any_store.stats("runpod", "s")
    assert (stats[QUEUED], stats[FAILED], stats[CANCELLED], stats["retried"]) == (
        before[QUEUED], 0, 1, before["retried"] + 1), stats
    jobs, total = any_store.list_jobs("runpod", "s", statuses=(QUEUED,))
    assert [j.id for j in jobs] == ["f1", "taken", "q2"] and total == 3
    assert sorted(any_store.purge_queued("runpod", "s")) == ["f1", "q2"]
    assert any_store.count((CANCELLED,), "runpod", "s") == 1
