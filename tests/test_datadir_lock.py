"""Issue 11.1: one server per data dir, and a busy port fails before anything is touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import datadir
from tests import serving
from tests.test_runpod import SlowRunner, slow_factory, wait_status


def serve_cli(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    """``imagegate serve`` in a subprocess that is expected to refuse to start."""
    env = {**os.environ, "IMAGEGATE_CACHE_DIR": str(serving.CACHE_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(data_dir),
         "--port", str(port), "--warmup-sizes", "64x64"],
        env=env, capture_output=True, text=True, timeout=300,
    )


def test_second_server_on_a_data_dir_refuses_and_leaves_its_jobs(tmp_path: Any) -> None:
    runner = SlowRunner(delay=30.0)
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner), job_concurrency=1,
                             max_batch_images=1) as live:
        url = f"{live.url}/v2/ep"
        inp = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
        ids = [httpx.post(f"{url}/run", json={"input": inp}).json()["id"] for _ in range(3)]
        assert wait_status(live, ids[0], ("IN_PROGRESS",), timeout=60)["status"] == "IN_PROGRESS"
        proc = serve_cli(tmp_path / "data", serving.free_port())
        assert proc.returncode == 2, proc.stderr
        assert "is in use by" in proc.stderr and f"pid {os.getpid()}" in proc.stderr, proc.stderr
        assert f"port {live.settings.port}" in proc.stderr, proc.stderr
        # The live server's jobs are untouched.
        statuses = [httpx.get(f"{url}/status/{i}").json()["status"] for i in ids]
        assert statuses == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"]
        for i in ids:
            httpx.post(f"{url}/cancel/{i}")
    # Released with the server: the next one may take it.
    path = datadir.acquire(tmp_path / "data")
    assert datadir.read_holder(path).pid == os.getpid()  # type: ignore[union-attr]
    datadir.release(tmp_path / "data")


def test_busy_port_fails_fast_before_touching_the_data_dir(tmp_path: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve_cli(tmp_path / "data", port)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists(), "the data dir was touched before the port check"
    assert "loaded tiny-sdxl" not in proc.stderr, "the model loaded before the port check"


def test_lock_is_reentrant_in_process_and_exclusive_across_processes(tmp_path: Any) -> None:
    first = datadir.acquire(tmp_path, port=1234)
    try:
        assert datadir.acquire(tmp_path) == first  # the same process may take it again
        datadir.release(tmp_path)
        code = ("import sys; from pathlib import Path; from gateway import datadir\n"
                "try:\n    datadir.acquire(Path(sys.argv[1]))\n"
                "except datadir.DataDirBusy as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout and "port 1234" in proc.stdout
    finally:
        datadir.release(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(autouse=True)
def _model_built(server: serving.LiveServer) -> None:
    """Subprocess servers share the session's model cache, built by the default server."""


def test_a_damaged_job_store_is_one_line_and_status_2(tmp_path: Any) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tasks.sqlite3").write_bytes(b"not a database, whatever it was " * 200)
    proc = serve_cli(data, serving.free_port())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("imagegate:")]
    assert len(line) == 1 and str(data / "tasks.sqlite3") in line[0], proc.stderr
    assert "file is not a database" in line[0], proc.stderr
