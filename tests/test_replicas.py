"""Issue 10.6: two imagegate processes on one Redis act as one (docs/replicas.md).

Two real ``imagegate serve`` subprocesses (tiny-sdxl, their own data dirs and ports) share a
Redis key prefix: a job submitted on A is polled and cancelled on B, and a replica killed with
SIGKILL mid-job loses nothing (the other one re-runs the job).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.cli import main as cli
from tests import serving

redis = pytest.importorskip("redis")

REDIS_DB = 7
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
SMALL = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2,
         "refiner_inference_steps": 4, "strength": 0.5}
# Long enough on tiny-sdxl to be caught IN_PROGRESS and killed (no fixed sleeps: the test waits
# for IN_PROGRESS, whatever the machine's speed).
LONG = {"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 60,
        "refiner_inference_steps": 60, "strength": 0.3}
# Two model loads, and a job run twice, on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1500)


def _redis_or_skip() -> Any:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {REDIS_URL}: {exc}")
    return client


@dataclass
class Replica:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 300,
             replicas: tuple[Replica, ...] = ()) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except httpx.TransportError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {r.name} ---\n{r.tail()}" for r in replicas)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
        time.sleep(0.02)


def start(name: str, tmp: Path, prefix: str) -> Replica:
    port = serving.free_port()
    log = tmp / f"{name}.log"
    env = {**os.environ, "IMAGEGATE_CACHE_DIR": str(serving.CACHE_DIR)}
    args = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
            "--data-dir", str(tmp / f"data-{name}"), "--redis-url", REDIS_URL,
            "--redis-prefix", prefix, "--replica-id", name, "--warmup-sizes", "64x64",
            "--job-concurrency", "1", "--max-batch-images", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(name, f"http://127.0.0.1:{port}", proc, log)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, server: serving.LiveServer
         ) -> Iterator[dict[str, Replica]]:
    """Replicas A and B on one Redis prefix (``server`` builds the shared model cache first)."""
    client = _redis_or_skip()
    prefix = f"imagegate-test-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("replicas")
    replicas = {n: start(n, tmp, prefix) for n in ("A", "B")}
    try:
        for r in replicas.values():
            wait_for(f"replica {r.name} to become ready",
                     lambda r=r: httpx.get(r.url + "/ready", timeout=30).status_code == 200,
                     timeout=300, replicas=tuple(replicas.values()))
        replicas["prefix"] = prefix  # type: ignore[assignment]
        yield replicas
    finally:
        for r in replicas.values():
            if isinstance(r, Replica) and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in replicas.values():
            if isinstance(r, Replica):
                try:
                    r.proc.wait(60)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def status(r: Replica, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{r.url}/v2/ep/status/{job_id}", timeout=60)
    assert resp.status_code == 200, (r.name, resp.text)
    return resp.json()


def test_submit_on_a_poll_and_fetch_on_b(pair: dict[str, Replica], capsys) -> None:
    a, b = pair["A"], pair["B"]
    job = httpx.post(f"{a.url}/v2/ep/run", json={"input": {**SMALL, "seed": 5}}, timeout=60).json()
    assert job["status"] == "IN_QUEUE"
    done = wait_for(f"job {job['id']} to complete, polled on B",
                    lambda: (s := status(b, job["id"]))["status"] == "COMPLETED" and s,
                    replicas=(a, b))
    assert done["output"]["seed"] == 5 and done["workerId"] in ("A", "B")
    png = base64.b64decode(done["output"]["images"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    # The same result on A: images live in Redis, not on one replica's disk.
    assert status(a, job["id"])["output"] == done["output"]
    # runsync on B of a fresh job, and the shared usage ledger in Redis.
    sync = httpx.post(f"{b.url}/v2/ep/runsync", json={"input": SMALL}, timeout=300).json()
    assert sync["status"] == "COMPLETED", sync
    client = redis.Redis.from_url(REDIS_URL)
    assert client.smembers(f"{pair['prefix']}:usage:index"), "no usage rows in Redis"
    client.close()
    # The operator's view of that ledger: `imagegate usage` pointed at Redis.
    capsys.readouterr()
    assert cli(["usage", "--redis-url", REDIS_URL, "--redis-prefix", pair["prefix"],
                "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and sum(r["requests"] for r in rows) >= 2, rows


def test_cancel_on_b_a_job_submitted_on_a(pair: dict[str, Replica]) -> None:
    a, b = pair["A"], pair["B"]
    job = httpx.post(f"{a.url}/v2/ep/run", json={"input": LONG}, timeout=60).json()
    wait_for(f"job {job['id']} to start", lambda: status(a, job["id"])["status"] == "IN_PROGRESS",
             replicas=(a, b))
    r = httpx.post(f"{b.url}/v2/ep/cancel/{job['id']}", timeout=60)
    assert r.json() == {"id": job["id"], "status": "CANCELLED"}
    assert status(a, job["id"])["status"] == "CANCELLED"
    # The replica that ran it stops holding it: a new job gets through on a free slot.
    nxt = httpx.post(f"{a.url}/v2/ep/runsync", json={"input": SMALL}, timeout=300).json()
    nxt = wait_for("a job after the cancel to complete",
                   lambda: (s := status(a, nxt["id"]))["status"] == "COMPLETED" and s,
                   replicas=(a, b))
    assert status(a, job["id"])["status"] == "CANCELLED"
    # /health counts the endpoint's jobs from Redis's per-scope heads: the same on both.
    health = [httpx.get(f"{r.url}/v2/ep/health", timeout=60).json()["jobs"] for r in (a, b)]
    assert health[0] == health[1], health
    assert health[0]["completed"] >= 1 and health[0]["inProgress"] == 0, health


def test_replica_killed_mid_job_loses_nothing(pair: dict[str, Replica]) -> None:
    a, b = pair["A"], pair["B"]
    job = httpx.post(f"{a.url}/v2/ep/run", json={"input": {**LONG, "seed": 9}},
                     timeout=60).json()
    running = wait_for(f"job {job['id']} to be IN_PROGRESS",
                       lambda: (s := status(a, job["id"]))["status"] == "IN_PROGRESS" and s,
                       replicas=(a, b))
    victim = pair[running["workerId"]]
    survivor = b if victim is a else a
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(60)
    # The survivor notices the missing heartbeat, re-queues the job once and runs it.
    done = wait_for(f"job {job['id']} to finish on {survivor.name} after {victim.name} died",
                    lambda: (s := status(survivor, job["id"]))["status"]
                    in ("COMPLETED", "FAILED") and s, timeout=600, replicas=(a, b))
    assert done["status"] == "COMPLETED", done
    assert done["workerId"] == survivor.name
    assert done["output"]["seed"] == 9
