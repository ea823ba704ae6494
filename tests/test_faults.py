"""Fault injection on the SQLite task store, the disk and restarts (in-process servers).

The faults are injected where they happen: a COMMIT that fails as SQLite fails it on a full disk
(it has rolled back already), a write that the store refuses for a reason that is no outage,
file writes that hit ENOSPC. Servers are stopped and started again on the same data dir, as a
restart does.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import serving
from tests.test_runpod import SlowRunner, slow_factory

INPUT = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
DEADLINE_S = 120.0


def wait_for(cond: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """``cond()``'s first true value; fails naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.02)
    return value


class FaultyConnection:
    """A SQLite connection whose COMMITs fail on demand, the way SQLite fails them.

    ``disk_full`` on: every COMMIT fails with SQLITE_FULL after SQLite rolled the transaction
    back (as it does). ``refuse_status``: the job write setting that status fails once with an
    error that is no outage (a bug, say).
    """

    def __init__(self, inner: sqlite3.Connection) -> None:
        self.inner = inner
        self.disk_full = threading.Event()
        self.refused = 0
        self.refuse_status: str | None = None

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql == "COMMIT" and self.disk_full.is_set():
            self.refused += 1
            self.inner.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        if (self.refuse_status is not None and sql.startswith("UPDATE jobs")
                and params[0] == self.refuse_status):
            self.refuse_status = None
            raise sqlite3.OperationalError("injected: no such column: nope")
        return self.inner.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def faulty_store(live: serving.LiveServer) -> FaultyConnection:
    store = live.app.state.ctx.jobs.store
    conn = FaultyConnection(store._conn)
    store._conn = conn
    return conn


def status(live: serving.LiveServer, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{live.url}/v2/ep/status/{job_id}", timeout=DEADLINE_S).json()


def final_status(live: serving.LiveServer, job_id: str) -> dict[str, Any]:
    return wait_for(lambda: (b := status(live, job_id))["status"] in ("COMPLETED", "FAILED")
                    and b, f"job {job_id} to finish")


def test_a_full_disk_at_commit_is_waited_out_and_the_job_completes(tmp_path: Path) -> None:
    runner = SlowRunner()
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner)) as live:
        conn = faulty_store(live)
        calls = runner.calls
        runner.delay = 1.0
        job = httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT}, timeout=DEADLINE_S).json()
        wait_for(lambda: runner.calls > calls, "the job to reach the engine")
        conn.disk_full.set()
        try:
            # The batch ends during the "outage"; its outcome write is refused more than once.
            wait_for(lambda: conn.refused >= 3, "the outcome write to be retried")
        finally:
            conn.disk_full.clear()
        body = final_status(live, job["id"])
        assert body["status"] == "COMPLETED", body
        assert body["output"], body


def test_an_outcome_the_store_refuses_fails_the_job_instead_of_leaving_it_running(
        tmp_path: Path) -> None:
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner())) as live:
        conn = faulty_store(live)
        conn.refuse_status = "completed"
        job = httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT}, timeout=DEADLINE_S).json()
        body = final_status(live, job["id"])
        assert conn.refuse_status is None, "the fault was never hit"
        assert body["status"] == "FAILED", body
        assert "could not record" in body["error"], body
        # The server goes on.
        again = httpx.post(f"{live.url}/v2/ep/runsync", json={"input": INPUT},
                           timeout=DEADLINE_S).json()
        assert again["status"] == "COMPLETED", again


def test_jobs_that_only_waited_survive_any_number_of_restarts(tmp_path: Path) -> None:
    """One job runs, two wait in the engine's queue; the server stops twice under them."""
    ids: list[str] = []
    for _restart in range(2):
        runner = SlowRunner()
        with serving.live_server(tmp_path, engine_factory=slow_factory(runner),
                                 max_batch_images=1, job_concurrency=4,
                                 drain_timeout_s=1) as live:
            runner.delay = 600.0  # past the warm-up: a batch runs until the stop abandons it
            for _ in range(3 - len(ids)):
                ids.append(httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT},
                                      timeout=DEADLINE_S).json()["id"])
            jobs = live.app.state.ctx.jobs

            def one_runs_two_wait(jobs: Any = jobs, live: serving.LiveServer = live) -> bool:
                return jobs.running == 3 and status(live, ids[0])["status"] == "IN_PROGRESS"

            wait_for(one_runs_two_wait, "one job to run and two to wait in the engine")
            assert [status(live, i)["status"] for i in ids[1:]] == ["IN_QUEUE", "IN_QUEUE"]
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner())) as live:
        first, *waited = (final_status(live, i) for i in ids)
        assert first["status"] == "FAILED" and "re-queued once" in first["error"], first
        assert [b["status"] for b in waited] == ["COMPLETED", "COMPLETED"], waited


def test_disk_full_errors_are_store_outages() -> None:
    from gateway.errors import is_store_outage

    assert is_store_outage(OSError(errno.ENOSPC, "No space left on device"))
    assert is_store_outage(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_store_outage(OSError(errno.EACCES, "Permission denied"))
    assert not is_store_outage(FileNotFoundError(errno.ENOENT, "gone"))


class FullDisk:
    """Temp-file writes (``.NAME.tmp``, as the stores and the media store make) hit ENOSPC.

    Half the bytes land first, as on a real disk that fills up mid-write.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = threading.Event()
        self.refused = 0
        real = Path.write_bytes
        disk = self

        def write_bytes(path: Path, data: bytes) -> int:
            if disk.on.is_set() and path.name.endswith(".tmp"):
                disk.refused += 1
                real(path, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_is_a_503_and_a_wait_never_a_500_or_a_leftover(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk(monkeypatch)
    runner = SlowRunner()
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner)) as live:
        data = Path(live.settings.data_path)
        disk.on.set()
        try:
            url_mode = httpx.post(f"{live.url}/v1/images/generations", timeout=DEADLINE_S,
                                  json={"prompt": "x", "size": "64x64", "response_format": "url"})
            job = httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT},
                             timeout=DEADLINE_S).json()
            # The job's images cannot be saved: retried, not failed.
            wait_for(lambda: disk.refused >= 3, "the job's image write to be retried")
            assert status(live, job["id"])["status"] in ("IN_QUEUE", "IN_PROGRESS")
        finally:
            disk.on.clear()
        assert url_mode.status_code == 503, url_mode.text
        assert url_mode.json()["error"]["code"] == "storage_unavailable"
        assert url_mode.headers.get("retry-after")
        body = final_status(live, job["id"])
        assert body["status"] == "COMPLETED", body
        assert not [p for p in data.rglob("*.tmp")], "a failed write left its temp file"
