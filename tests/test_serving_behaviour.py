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

# Generous deadlines: a busy 2-core CI machine may be many times slower than a laptop. Every
# wait names what it waited for, so a failure says what timed out.
DEADLINE = 120.0


def _wait(cond, what: str, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.02)


class Poster(threading.Thread):
    """POSTs one generation in a thread; keeps the response, or the error that ended it."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url + "/v1/images/generations", json=self.body,
                                       timeout=DEADLINE * 2)
        except Exception as exc:  # noqa: BLE001 - reported by result(), not lost as a warning
            self.error = exc

    def result(self) -> httpx.Response:
        """The response; fails naming the request if it did not finish or raised."""
        self.join(DEADLINE * 2)
        assert not self.is_alive(), f"request {self.body['prompt']!r} still running after join"
        assert self.error is None, f"request {self.body['prompt']!r} failed: {self.error!r}"
        assert self.response is not None
        return self.response


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=DEADLINE).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_full_queue_is_429_with_retry_after(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner), max_queue_images=1) as srv:
        runner.batches.clear()
        runner.hold()
        t1 = Poster(srv.url, {"prompt": "running", "size": "64x64"})
        _wait(runner.entered.is_set, "the first request to reach the runner")
        t2 = Poster(srv.url, {"prompt": "queued", "size": "64x64"})
        _wait(lambda: srv.engine.queued_images == 1, "the second request to be queued")
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            c.images.generate(prompt="over", size="64x64")
        assert err.value.status_code == 429
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "server_overloaded"
        runner.release()
        assert [t1.result().status_code, t2.result().status_code] == [200, 200]
        assert srv.metric("imagegate_errors_total", {"dialect": "openai", "cause": "overload"}) == 1


def raw_post(url: str, payload: dict) -> socket.socket:
    """Send an OpenAI generation over a bare socket and return it open (close it to leave)."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_client_disconnect_drops_the_queued_request(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner)) as srv:
        runner.batches.clear()
        runner.hold()
        t1 = Poster(srv.url, {"prompt": "running", "size": "64x64"})
        _wait(runner.entered.is_set, "the first request to reach the runner")
        sock = raw_post(srv.url, {"prompt": "abandoned", "size": "64x64"})
        _wait(lambda: srv.engine.queued_images == 1, "the raw-socket request to be queued")
        sock.close()
        _wait(lambda: srv.engine.queued_images == 0, "the abandoned request to leave the queue")
        runner.release()
        assert t1.result().status_code == 200
        _wait(lambda: srv.engine.queued_images == 0 and srv.engine.ready, "the engine to settle")
        assert [p for b in runner.batches for p, _ in b] == ["running"]
        assert srv.metric("imagegate_errors_total", {"dialect": "openai", "cause": "cancelled"}) == 1


def test_client_leaving_a_running_batch_costs_the_others_nothing(tmp_path):
    """A client that disconnects while its image is being made: its batch mates still get theirs,
    the server records a cancellation (not an error) and keeps serving."""
    runner = FakeRunner()
    factory = engine_factory(runner, max_batch_images=2, max_wait_ms=30_000)
    with live_server(tmp_path, engine_factory=factory) as srv:
        runner.batches.clear()
        runner.hold()
        sock = raw_post(srv.url, {"prompt": "leaver", "size": "64x64"})
        _wait(lambda: srv.engine.queued_images == 1, "the leaver to be queued")
        # The idle executor waits (max_wait_ms) for a second image, so both share one batch.
        stayer = Poster(srv.url, {"prompt": "stayer", "size": "64x64"})
        _wait(runner.entered.is_set, "the shared batch to reach the runner")
        sock.close()
        _wait(lambda: srv.metric("imagegate_errors_total",
                                 {"dialect": "openai", "cause": "cancelled"}) == 1,
              "the server to notice the leaver's disconnect")
        runner.release()
        resp = stayer.result()
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 1
        assert [sorted(p for p, _ in b) for b in runner.batches] == [["leaver", "stayer"]]
        # Two images fill a batch, so the executor does not wait max_wait_ms for company.
        after = httpx.post(srv.url + "/v1/images/generations",
                           json={"prompt": "after", "size": "64x64", "n": 2}, timeout=60)
        assert after.status_code == 200, after.text
        assert len(after.json()["data"]) == 2
        assert srv.metric("imagegate_errors_total", {"dialect": "openai", "cause": "internal"}) == 0


def test_metrics_endpoint_has_sane_values(server):
    c = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    for _ in range(2):
        c.images.generate(prompt="m", size="64x64", extra_body={"num_inference_steps": 2})
    scrape = httpx.get(server.url + "/metrics")
    assert scrape.headers["content-type"].count("charset") == 1, scrape.headers["content-type"]
    text = scrape.text
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


@pytest.mark.timeout(600)
def test_sigterm_drains_then_exits(tmp_path):
    port = free_port()
    env = {**os.environ, "IMAGEGATE_PORT": str(port), "IMAGEGATE_DATA_DIR": str(tmp_path),
           "IMAGEGATE_MAX_BATCH_IMAGES": "1", "IMAGEGATE_WARMUP_SIZES": "64x64",
           "IMAGEGATE_DRAIN_TIMEOUT_S": str(DEADLINE)}
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
        _wait(ready, "the served subprocess to report ready")
        slow = {"prompt": "slow", "size": "256x256", "num_inference_steps": 25}
        threads = [Poster(url, slow) for _ in range(2)]
        # One image per batch: one request runs, the other waits in the queue.
        _wait(lambda: _metric(url, "imagegate_queue_images") >= 1, "a request to be queued")
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(url + "/ready", timeout=DEADLINE).status_code == 503,
              "/ready to turn 503 after SIGTERM")
        late = httpx.post(url + "/v1/images/generations", json={"prompt": "late"},
                          timeout=DEADLINE)
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "shutting_down"
        # Both finished within the drain.
        assert [t.result().status_code for t in threads] == [200, 200]
        _assert_exits_after_drain(proc)
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
        assert release.wait(DEADLINE), "the test never released the model load"
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
        _wait(lambda: httpx.get(srv.url + "/ready").status_code == 200, "/ready to turn 200")
        assert c.images.generate(prompt="now", size="64x64").data


def _serve(tmp_path, *args: str, **env_extra: str) -> tuple[subprocess.Popen, str]:
    from tests import serving

    port = free_port()
    env = {**os.environ, "IMAGEGATE_PORT": str(port), "IMAGEGATE_DATA_DIR": str(tmp_path),
           "IMAGEGATE_CACHE_DIR": str(serving.CACHE_DIR), "IMAGEGATE_WARMUP_SIZES": "64x64",
           **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _assert_exits_after_drain(proc: subprocess.Popen) -> None:
    try:
        code = proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {DEADLINE:.0f}s of draining")
    assert code in (0, -signal.SIGTERM)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(600)
def test_json_logs_cover_every_line_with_one_access_line_per_request(tmp_path, server):
    # ``server`` only makes sure tiny-sdxl is built in the shared cache first.
    marker = "zebracorn"
    proc, url = _serve(tmp_path, "--log-format", "json", "--host", "127.0.0.1")
    try:
        _wait(lambda: _ready(url) or proc.poll() is not None, "the server to report ready")
        assert proc.poll() is None, proc.stdout.read()
        long_prompt = " ".join([marker] * 200)  # far past CLIP's 77 tokens
        ok = httpx.post(url + "/v1/images/generations", timeout=DEADLINE,
                        headers={"x-request-id": "req-ok"},
                        json={"prompt": long_prompt, "negative_prompt": marker,
                              "size": "64x64", "num_inference_steps": 2})
        assert ok.status_code == 200, ok.text
        bad = httpx.post(url + "/v1/images/generations", json={"prompt": marker, "n": 0},
                         headers={"x-request-id": "req-bad"}, timeout=DEADLINE)
        assert bad.status_code == 400
        for rid, path, body in (
                ("req-a1111", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64,
                                                    "height": 64}),
                ("req-hf", "/", {"inputs": "x", "parameters": {"num_inference_steps": 2,
                                                               "width": 64, "height": 64}})):
            made = httpx.post(url + path, json=body, headers={"x-request-id": rid},
                              timeout=DEADLINE)
            assert made.status_code == 200, made.text
        # Answered by the router itself, before any handler: still logged and labelled.
        missing = httpx.get(url + "/v1/nothing", headers={"x-request-id": "req-404"})
        assert missing.status_code == 404
        assert missing.headers["x-request-id"] == "req-404"
        assert missing.headers["x-content-type-options"] == "nosniff"
        assert missing.json()["error"]["request_id"] == "req-404"
        scan = httpx.get(url + "/wp-login.php", headers={"x-request-id": "req-scan"})
        assert scan.status_code == 404
        scraped = httpx.get(url + "/metrics").text
        assert 'imagegate_http_requests_total{dialect="unmatched",route="unmatched",status="404"}' \
            in scraped, "a path nobody owns was counted against a dialect"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line[:300]}")
    assert marker not in out, "prompt text reached the log"
    assert any(r["logger"].startswith("uvicorn") for r in records), "no uvicorn line seen"
    access = {r.get("request_id"): r for r in records if r["logger"] == "imagegate.access"}
    assert access["req-ok"]["status"] == 200 and access["req-ok"]["images"] == 1
    assert access["req-ok"]["route"] == "/v1/images/generations"
    assert access["req-ok"]["dialect"] == "openai" and access["req-ok"]["seconds"] > 0
    assert access["req-bad"]["status"] == 400 and access["req-bad"]["images"] == 0
    assert access["req-a1111"]["images"] == 1 and access["req-hf"]["images"] == 1
    assert access["req-404"]["status"] == 404 and access["req-404"]["route"] == "unmatched"
    assert access["req-404"]["dialect"] == "openai" and access["req-scan"]["dialect"] == "unmatched"
    # The readiness polls above and the /metrics scrape are at DEBUG, under this INFO log.
    probes = [r for r in records if r["logger"] == "imagegate.access"
              and r.get("route") in ("/ready", "/metrics")]
    assert not probes, probes[:3]


@pytest.mark.timeout(600)
def test_a_model_that_fails_to_load_exits_non_zero(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    proc, _ = _serve(tmp_path, str(broken))
    try:
        code = proc.wait(DEADLINE * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server kept running with a model that cannot load")
    out = proc.stdout.read()
    assert code != 0, out
    assert "model failed to load" in out


class Waiter(threading.Thread):
    """POSTs one request that waits on an async job; keeps the response or the error."""

    def __init__(self, url: str, body: dict, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers = url, body, headers or {}
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url, json=self.body, headers=self.headers,
                                       timeout=DEADLINE * 2)
        except Exception as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self) -> httpx.Response:
        self.join(DEADLINE * 2)
        assert not self.is_alive() and self.error is None, (self.url, self.error)
        assert self.response is not None
        return self.response


@pytest.mark.timeout(600)
def test_sigterm_answers_requests_waiting_on_jobs_with_the_job_state(tmp_path, server):
    """RunPod runsync, DashScope and ModelsLab sync calls answer as when their wait runs out."""
    # ``server`` only makes sure tiny-sdxl is built in the shared cache first.
    # A drain too short for the jobs: they go back to the queue, for the next server.
    proc, url = _serve(tmp_path, IMAGEGATE_MAX_BATCH_IMAGES="1", IMAGEGATE_DRAIN_TIMEOUT_S="1",
                       IMAGEGATE_MODELSLAB_WAIT_S="300")
    try:
        _wait(lambda: _ready(url) or proc.poll() is not None, "the server to report ready")
        assert proc.poll() is None, proc.stdout.read()
        # The first job keeps the engine busy (one image per batch); the others wait behind it.
        starts = _metric(url, "imagegate_queue_wait_seconds_count")
        runpod = Waiter(f"{url}/v2/ep/runsync", {"input": {
            "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 150,
            "refiner_inference_steps": 4}})
        _wait(lambda: _metric(url, "imagegate_queue_wait_seconds_count") > starts,
              "the runsync job to start")
        dashscope = Waiter(f"{url}/api/v1/services/aigc/text2image/image-synthesis",
                           {"model": "stable-diffusion-xl", "input": {"prompt": "x"},
                            "parameters": {"size": "64*64", "steps": 2}})
        modelslab = Waiter(f"{url}/api/v3/text2img", {"key": "k", "prompt": "x", "width": 64,
                                                      "height": 64, "num_inference_steps": 2})
        _wait(lambda: _metric(url, "imagegate_queue_images") >= 2, "two jobs to wait")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answers = [w.result() for w in (runpod, dashscope, modelslab)]
        # Answered at once, not cut off at uvicorn's shutdown timeout (a bare 500).
        assert time.monotonic() - began < DEADLINE
        for answer in answers:
            assert answer.status_code == 200, (answer.url, answer.status_code, answer.text)
        body = answers[0].json()
        assert body["id"] and body["status"] in ("IN_QUEUE", "IN_PROGRESS"), body
        body = answers[1].json()
        assert body["output"]["task_status"] in ("PENDING", "RUNNING"), body
        assert body["output"]["task_id"]
        body = answers[2].json()
        assert body["status"] == "processing" and body["id"] and body["fetch_result"], body
        _assert_exits_after_drain(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
