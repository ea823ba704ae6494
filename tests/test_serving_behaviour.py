"""Overload, disconnects and SIGTERM drain, over real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.fakes import FakeRunner, engine_factory
from tests.serving import free_port, live_server


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.01)


def _post_in_thread(url: str, body: dict, out: list) -> threading.Thread:
    def go():
        out.append(httpx.post(url + "/v1/images/generations", json=body, timeout=30))
    t = threading.Thread(target=go)
    t.start()
    return t


def test_full_queue_is_429_with_retry_after(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner), max_queue_images=1) as srv:
        runner.batches.clear()
        runner.hold()
        results: list = []
        t1 = _post_in_thread(srv.url, {"prompt": "running", "size": "64x64"}, results)
        _wait(runner.entered.is_set)
        t2 = _post_in_thread(srv.url, {"prompt": "queued", "size": "64x64"}, results)
        _wait(lambda: srv.engine.queued_images == 1)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            c.images.generate(prompt="over", size="64x64")
        assert err.value.status_code == 429
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "server_overloaded"
        runner.release()
        t1.join(10)
        t2.join(10)
        assert [r.status_code for r in results] == [200, 200]
        assert srv.metric("imagegate_errors_total", {"dialect": "openai", "cause": "overload"}) == 1


def test_client_disconnect_drops_the_queued_request(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner)) as srv:
        runner.batches.clear()
        runner.hold()
        results: list = []
        t1 = _post_in_thread(srv.url, {"prompt": "running", "size": "64x64"}, results)
        _wait(runner.entered.is_set)
        body = json.dumps({"prompt": "abandoned", "size": "64x64"}).encode()
        port = int(srv.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait(lambda: srv.engine.queued_images == 1)
        sock.close()
        _wait(lambda: srv.engine.queued_images == 0)
        runner.release()
        t1.join(10)
        assert results[0].status_code == 200
        time.sleep(0.1)
        assert [p for b in runner.batches for p, _ in b] == ["running"]
        assert srv.metric("imagegate_errors_total", {"dialect": "openai", "cause": "cancelled"}) == 1


def test_metrics_endpoint_has_sane_values(server):
    c = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    for _ in range(2):
        c.images.generate(prompt="m", size="64x64", extra_body={"num_inference_steps": 2})
    text = httpx.get(server.url + "/metrics").text
    assert 'imagegate_http_requests_total{dialect="openai",route="/images/generations",status="200"}' in text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["imagegate_model_loaded"] == 1
    assert samples["imagegate_ready"] == 1
    assert samples["imagegate_images_generated_total"] >= 2
    assert samples["imagegate_batch_duration_seconds_count"] >= 2
    assert samples["imagegate_denoise_step_seconds_sum"] > 0
    assert samples["imagegate_vae_decode_seconds_count"] >= 2
    assert samples['imagegate_encode_seconds_count{format="png"}'] >= 2
    assert samples["imagegate_warmup_seconds"] > 0
    assert samples["imagegate_queue_images"] == 0


@pytest.mark.timeout(120)
def test_sigterm_drains_then_exits(tmp_path):
    port = free_port()
    env = {**os.environ, "IMAGEGATE_PORT": str(port), "IMAGEGATE_DATA_DIR": str(tmp_path),
           "IMAGEGATE_MAX_BATCH_IMAGES": "1", "IMAGEGATE_WARMUP_SIZES": "64x64"}
    from tests import serving

    env["IMAGEGATE_CACHE_DIR"] = str(serving.CACHE_DIR)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return httpx.get(url + "/ready").status_code == 200
            except httpx.TransportError:
                return False
        _wait(ready, 90)
        results: list = []
        slow = {"prompt": "slow", "size": "256x256", "num_inference_steps": 25}
        threads = [_post_in_thread(url, slow, results) for _ in range(2)]
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        late = httpx.post(url + "/v1/images/generations", json={"prompt": "late"}, timeout=10)
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]  # both finished within the drain
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_503_while_the_model_loads(tmp_path):
    from inference import Engine, EngineConfig, ModelInfo
    from observability.metrics import Metrics

    release = threading.Event()
    runner = FakeRunner()
    info = ModelInfo(id="slow", source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=False, created=0)

    def slow_factory(_cfg):
        release.wait(30)
        return runner, info

    def build(settings, metrics: Metrics) -> Engine:
        return Engine(EngineConfig(), metrics, runner_factory=slow_factory)

    with live_server(tmp_path, engine_factory=build, wait_ready=False) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            c.images.generate(prompt="early", size="64x64")
        assert err.value.status_code == 503
        assert err.value.code == "model_loading"
        assert int(err.value.response.headers["retry-after"]) >= 1
        release.set()
        _wait(lambda: httpx.get(srv.url + "/ready").status_code == 200)
        assert c.images.generate(prompt="now", size="64x64").data
