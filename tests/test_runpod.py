"""RunPod serverless dialect (worker-sdxl schema): SDK, queue API, refiner modes, image_url
fetching and its SSRF rules, webhooks, durable jobs across restarts.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.jobs import job_store
from inference import Engine, EngineConfig, ModelInfo
from inference.batch import Batch
from inference.errors import Cancelled
from inference.runner import StepTimes
from inference.tasks import RUNNING, Job
from tests import fakes, serving

KEY = "test-key"
AUTH = {"authorization": KEY}  # RunPod's raw-key form
BEARER = {"authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "refiner_inference_steps": 4,
         "strength": 0.5}


def png_bytes(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30)
              ) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# -- a local HTTP server: images, redirects, webhooks ---------------------------------------


class Site:
    """Serves test images and records webhook posts."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail_posts = 0
        # /slow.png answers once this is set (or after a minute).
        self.slow = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/cat.png":
                    self._send(200, png_bytes(), "image/png")
                elif self.path == "/hop":
                    self._send(302, b"", "text/plain", {"location": "/cat.png"})
                elif self.path == "/to-metadata":
                    self._send(302, b"", "text/plain",
                               {"location": "http://169.254.169.254/latest/meta-data/"})
                elif self.path == "/loop":
                    self._send(302, b"", "text/plain", {"location": "/loop"})
                elif self.path == "/page":
                    self._send(200, b"<html>hi</html>", "text/html")
                elif self.path == "/big.png":
                    self._send(200, b"\x89PNG" + b"\0" * 300_000, "image/png")
                elif self.path == "/garbage.png":
                    self._send(200, b"not an image at all", "image/png")
                elif self.path == "/huge.png":
                    self._send(200, png_bytes((400, 400)), "image/png")
                elif self.path == "/slow.png":
                    outer.slow.wait(60)
                    self._send(200, png_bytes(), "image/png")
                else:
                    self._send(404, b"no", "text/plain")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts.append(json.loads(body))
                if outer.fail_posts > 0:
                    outer.fail_posts -= 1
                    self._send(500, b"try again", "text/plain")
                else:
                    self._send(200, b"ok", "text/plain")

        self.httpd = fakes.QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    """tiny-sdxl (with its tiny refiner), keyed, local fetches and webhooks allowed."""
    with serving.live_server(
        tmp_path_factory.mktemp("runpod"), api_keys=KEY, warmup_sizes="64x64",
        fetch_allow="127.0.0.1", webhook_allow="127.0.0.1", webhook_retry_delay_s=0.1,
        fetch_max_bytes=200_000, fetch_max_pixels=100_000, job_sweep_interval_s=0.2,
    ) as live:
        yield live


def runsync(live: serving.LiveServer, inp: dict[str, Any], **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{live.url}/v2/ep/runsync", json={"input": inp, **extra}, headers=AUTH,
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(live: serving.LiveServer, job_id: str, statuses: tuple[str, ...],
                timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{live.url}/v2/ep/status/{job_id}", headers=AUTH, timeout=120).json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


# -- the runpod SDK against a live server ----------------------------------------------------


@pytest.fixture
def sdk(rp: serving.LiveServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    import runpod

    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", rp.url + "/v2")
    monkeypatch.setattr(runpod, "endpoint_url_base", rp.url + "/v2")
    monkeypatch.setattr(runpod, "api_key", KEY)
    return runpod


def test_sdk_run_sync(sdk: Any) -> None:
    out = sdk.Endpoint("sdxl").run_sync({"prompt": "a red fox", "seed": 7, **SMALL}, timeout=120)
    assert set(out) == {"images", "image_url", "seed"}
    assert out["seed"] == 7 and out["image_url"] == out["images"][0]
    assert decode(out["images"][0]).size == (64, 64)


def test_sdk_run_status_output(sdk: Any) -> None:
    job = sdk.Endpoint("sdxl").run({"input": {"prompt": "a boat", "num_images": 2, **SMALL}})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    out = job.output(timeout=120)
    assert job.status() == "COMPLETED"
    assert len(out["images"]) == 2
    assert out["images"][0] != out["images"][1]


def test_sdk_bad_key_is_401(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk, "api_key", "wrong")
    with pytest.raises(RuntimeError, match="401"):
        sdk.Endpoint("sdxl").run({"prompt": "x"})


# -- queue API over plain HTTP ---------------------------------------------------------------


def test_auth_raw_and_bearer(rp: serving.LiveServer) -> None:
    for headers in (AUTH, BEARER):
        assert httpx.get(f"{rp.url}/v2/ep/health", headers=headers, timeout=120).status_code == 200
    r = httpx.get(f"{rp.url}/v2/ep/health", timeout=120)
    assert r.status_code == 401 and "error" in r.json()
    r = httpx.post(f"{rp.url}/v2/ep/run", content=b"{nope", headers=AUTH, timeout=120)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{rp.url}/v2/ep/nothing-here", headers=AUTH, timeout=120).status_code == 404


def test_unknown_key_and_bad_types_fail_the_job(rp: serving.LiveServer) -> None:
    body = runsync(rp, {"prompt": "x", "colour": "red"})
    assert body["status"] == "FAILED"
    assert body["error"] == "Unexpected input. colour is not a valid input option."
    body = runsync(rp, {"prompt": "x", "num_inference_steps": "many"})
    assert body["status"] == "FAILED" and "num_inference_steps" in body["error"]
    body = runsync(rp, {"prompt": "x", "num_images": 3})
    assert body["status"] == "FAILED" and "num_images" in body["error"]
    body = runsync(rp, {"prompt": "x", "scheduler": "Euler a"})
    assert body["status"] == "FAILED" and "scheduler" in body["error"]
    body = runsync(rp, {"negative_prompt": "x"})
    assert body["status"] == "FAILED" and "prompt is required" in body["error"]
    # Canonical validation, renamed to worker-sdxl's field names.
    body = runsync(rp, {**SMALL, "prompt": "x", "width": 100})
    assert body["status"] == "FAILED" and body["error"].startswith("width must be a multiple")
    body = runsync(rp, {**SMALL, "prompt": "x", "num_inference_steps": 1000})
    assert body["status"] == "FAILED" and body["error"].startswith("num_inference_steps")


def test_every_scheduler_name_runs(rp: serving.LiveServer) -> None:
    for name in ("PNDM", "KLMS", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep",
                 "DPMSolverSinglestep"):
        body = runsync(rp, {**SMALL, "prompt": "x", "scheduler": name, "strength": 0.25})
        assert body["status"] == "COMPLETED", (name, body.get("error"))


def test_refiner_both_modes(rp: serving.LiveServer) -> None:
    plain = runsync(rp, {**SMALL, "prompt": "a lighthouse", "seed": 3})
    experts = runsync(rp, {**SMALL, "prompt": "a lighthouse", "seed": 3,
                           "num_inference_steps": 4, "high_noise_frac": 0.5})
    for body in (plain, experts):
        assert body["status"] == "COMPLETED", body
        assert decode(body["output"]["image_url"]).size == (64, 64)
        assert body["delayTime"] >= 0 and body["executionTime"] > 0 and body["workerId"]
    assert plain["output"]["images"] != experts["output"]["images"]
    again = runsync(rp, {**SMALL, "prompt": "a lighthouse", "seed": 3})
    assert again["output"]["images"] == plain["output"]["images"]


def test_img2img_from_data_uri_and_local_server(rp: serving.LiveServer, site: Site) -> None:
    for url in (data_uri(png_bytes((96, 96))), f"{site.url}/cat.png", f"{site.url}/hop"):
        body = runsync(rp, {"image_url": url, "width": 64, "height": 64, "strength": 0.5,
                            "refiner_inference_steps": 4, "seed": 1})
        assert body["status"] == "COMPLETED", body
        assert decode(body["output"]["images"][0]).size == (64, 64)


def test_fetching_inputs_counts_against_the_execution_timeout(rp: serving.LiveServer,
                                                              site: Site) -> None:
    """An image_url slower than the job's 5 s execution timeout times the job out (the fetch
    itself would wait 15 s)."""
    site.slow.clear()
    try:
        r = httpx.post(f"{rp.url}/v2/ep/run", headers=AUTH, timeout=120, json={
            "input": {"image_url": f"{site.url}/slow.png", "width": 64, "height": 64},
            "policy": {"executionTimeout": 5_000}})
        body = wait_status(rp, r.json()["id"], ("TIMED_OUT", "FAILED", "COMPLETED"))
    finally:
        site.slow.set()
    assert body["status"] == "TIMED_OUT", body
    assert "execution timeout of 5s" in body["error"]


@pytest.mark.parametrize(("path", "reason"), [
    ("/to-metadata", "169.254.169.254"),   # allowed host redirecting to cloud metadata
    ("/loop", "too many redirects"),
    ("/page", "did not return an image"),
    ("/big.png", "byte limit"),
    ("/garbage.png", "not a readable image"),
    ("/huge.png", "pixel limit"),
])
def test_image_url_refusals(rp: serving.LiveServer, site: Site, path: str, reason: str) -> None:
    body = runsync(rp, {"image_url": site.url + path, **SMALL})
    assert body["status"] == "FAILED"
    assert body["error"].startswith("image_url:") and reason in body["error"], body["error"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.2/x.png",            # loopback outside the allow-list
    "http://[::1]/x.png",                # IPv6 loopback
    "http://169.254.169.254/latest/",    # link-local / cloud metadata
    "http://10.1.2.3/x.png",             # private
    "http://192.168.0.1/x.png",          # private
    "http://[fd00::1]/x.png",            # IPv6 unique-local
    "http://224.0.0.1/x.png",            # multicast
    "http://0.0.0.0/x.png",              # unspecified
    "http://240.0.0.1/x.png",            # reserved
    "http://[::ffff:127.0.0.1]/x.png",   # IPv4-mapped IPv6 loopback
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped metadata
    "http://100.64.0.1/x.png",           # shared address space (CGNAT)
    "file:///etc/passwd",
    "ftp://example.com/x.png",
])
def test_ssrf_classes_refused(rp: serving.LiveServer, url: str) -> None:
    body = runsync(rp, {"image_url": url, **SMALL})
    assert body["status"] == "FAILED"
    assert body["error"].startswith("image_url:"), body["error"]
    assert "refusing" in body["error"] or "not allowed" in body["error"], body["error"]


def test_fetch_rules_unit() -> None:
    import asyncio
    import ipaddress

    from gateway.fetch import AllowList, FetchPolicy, FetchRefused, blocked_reason, resolve_checked

    assert blocked_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert blocked_reason(ipaddress.ip_address("2606:4700::1111")) is None
    assert blocked_reason(ipaddress.ip_address("64:ff9b::a9fe:a9fe")) == "link-local"  # NAT64
    assert blocked_reason(ipaddress.ip_address("2002:7f00:1::")) == "loopback"  # 6to4
    policy = FetchPolicy(allow=AllowList.parse("10.0.0.0/8,internal.example"))
    assert asyncio.run(resolve_checked("http://10.9.9.9/a", policy))[2] is not None
    assert asyncio.run(resolve_checked("http://internal.example/a", policy))[2] is None
    with pytest.raises(FetchRefused):
        asyncio.run(resolve_checked("http://user:pw@8.8.8.8/", policy))
    with pytest.raises(FetchRefused, match="loopback"):  # by name, after DNS resolution
        asyncio.run(resolve_checked("http://localhost:8000/", FetchPolicy()))


MALFORMED_URLS = [
    "http://example.com:99999/x.png",  # port out of range
    "http://example.com:abc/x.png",    # port not a number
    "http://[::1/x.png",               # unclosed IPv6 bracket
    "http://8.8.8.8:99999/x.png",      # a literal address, whose port DNS never checks
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_urls_are_refused_naming_the_field(rp: serving.LiveServer, url: str) -> None:
    import asyncio

    from gateway.fetch import AddressRefused, FetchPolicy, resolve_checked

    with pytest.raises(AddressRefused, match="malformed URL"):
        asyncio.run(resolve_checked(url, FetchPolicy()))
    body = runsync(rp, {"image_url": url, **SMALL})
    assert body["status"] == "FAILED" and body["error"].startswith("image_url: malformed URL"), body
    r = httpx.post(f"{rp.url}/v2/ep/run", headers=AUTH, timeout=120,
                   json={"input": {"prompt": "x", **SMALL}, "webhook": url})
    assert r.status_code == 400 and r.json()["error"].startswith("webhook: malformed URL"), r.text


def test_retry_purge_health_ttl(rp: serving.LiveServer) -> None:
    url = f"{rp.url}/v2/ttl-ep"
    failed = httpx.post(f"{url}/runsync", headers=AUTH,
                        json={"input": {"prompt": "x", "nope": 1}}, timeout=120).json()
    assert failed["status"] == "FAILED"
    # Only FAILED / TIMED_OUT jobs may be retried; a retried bad input fails again.
    r = httpx.post(f"{url}/retry/{failed['id']}", headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json() == {"id": failed["id"], "status": "IN_QUEUE"}
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/status/{failed['id']}", headers=AUTH, timeout=120).json()["status"] != "FAILED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ok = httpx.post(f"{url}/runsync", headers=AUTH,
                    json={"input": {"prompt": "x", **SMALL}}, timeout=120).json()
    assert ok["status"] == "COMPLETED"
    r = httpx.post(f"{url}/retry/{ok['id']}", headers=AUTH, timeout=120)
    assert r.status_code == 400 and "COMPLETED" in r.json()["error"]
    health = httpx.get(f"{url}/health", headers=BEARER, timeout=120).json()
    assert health["jobs"] == {"completed": 1, "failed": 1, "inProgress": 0, "inQueue": 0,
                              "retried": 1}
    assert health["workers"]["ready"] == 1
    assert httpx.post(f"{url}/purge-queue", headers=AUTH, timeout=120).json() == {"removed": 0,
                                                                     "status": "completed"}
    # Another endpoint id (or another key) does not see the job.
    assert httpx.get(f"{rp.url}/v2/other/status/{ok['id']}", headers=AUTH, timeout=120).status_code == 404


def test_ttl_expiry(tmp_path: Any) -> None:
    # The server's default ttl: RunPod's policy.ttl starts at 10 s, too long to wait for here.
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                             job_sweep_interval_s=0.2, job_ttl_s=1.5) as live:
        url = f"{live.url}/v2/ep"
        submitted = time.monotonic()
        ok = httpx.post(f"{url}/runsync", json={"input": {
            "prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}},
            timeout=120).json()
        assert ok["status"] == "COMPLETED"
        results = live.app.state.ctx.jobs.store.results_dir / ok["id"]
        assert results.exists()
        assert httpx.get(f"{url}/status/{ok['id']}", timeout=120).json()["status"] == "COMPLETED"
        # Gone (404) once the ttl passes; its files are swept in the background.
        time.sleep(max(0.0, submitted + 1.6 - time.monotonic()))
        r = httpx.get(f"{url}/status/{ok['id']}", timeout=120)
        assert r.status_code == 404 and "error" in r.json()
        deadline = time.monotonic() + 120
        while results.exists():
            assert time.monotonic() < deadline, "expired results were not swept"
            time.sleep(0.1)

def test_policy_bounds_are_runpods(rp: serving.LiveServer) -> None:
    """executionTimeout 5 s–7 days, ttl 10 s–7 days (RunPod's operation reference), in ms."""
    week = 7 * 24 * 3600 * 1000
    for policy, field in (({"ttl": 9_999}, "policy.ttl"), ({"ttl": week + 1}, "policy.ttl"),
                          ({"executionTimeout": 4_999}, "policy.executionTimeout"),
                          ({"executionTimeout": week + 1}, "policy.executionTimeout")):
        r = httpx.post(f"{rp.url}/v2/ep/run", json={"input": {"prompt": "x"}, "policy": policy},
                       headers=AUTH, timeout=120)
        assert r.status_code == 400, (policy, r.text)
        assert field in r.json()["error"] and "between" in r.json()["error"]
    # The bounds themselves are accepted. 5 s is a real limit: on a loaded 2-core machine the tiny
    # job can take longer (or be estimated to, and refused at admission), so any of the three
    # endings is right, as long as it is that limit that ended it.
    body = runsync(rp, {"prompt": "x", **SMALL}, policy={"ttl": 10_000, "executionTimeout": 5_000})
    assert body["status"] in ("COMPLETED", "TIMED_OUT", "FAILED"), body
    assert (body["status"] == "COMPLETED" or "execution timeout of 5s" in body["error"]
            or "left of its execution timeout" in body["error"]), body


def test_webhook_delivered_with_retry(rp: serving.LiveServer, site: Site) -> None:
    site.posts.clear()
    site.fail_posts = 1
    r = httpx.post(f"{rp.url}/v2/ep/run", headers=AUTH, json={
        "input": {"prompt": "x", **SMALL}, "webhook": f"{site.url}/hook"}, timeout=120)
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while len(site.posts) < 2:
        assert time.monotonic() < deadline, site.posts
        time.sleep(0.05)
    assert [p["id"] for p in site.posts] == [job_id, job_id]
    assert site.posts[1]["status"] == "COMPLETED" and site.posts[1]["output"]["images"]
    # Webhook URLs follow the SSRF rules (only 127.0.0.1 is allow-listed here).
    r = httpx.post(f"{rp.url}/v2/ep/run", headers=AUTH, json={
        "input": {"prompt": "x"}, "webhook": "http://169.254.169.254/hook"}, timeout=120)
    assert r.status_code == 400 and "webhook" in r.json()["error"]


# -- slow fake engine: cancel, runsync timeout, purge, 429, restart -------------------------


class SlowRunner:
    """Takes ``delay`` seconds per request batch unless every request in it is cancelled."""

    has_refiner = True

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        self.calls += 1
        warmup = all(s.ticket.prompt == "warm-up" for s in batch.slots)
        end = time.monotonic() + (0.0 if warmup else self.delay)  # slow requests, quick start
        while time.monotonic() < end:
            if batch.all_abandoned():
                raise Cancelled("cancelled")
            time.sleep(0.01)
        h, w = batch.key.height, batch.key.width
        return ([np.full((h, w, 3), 0.5, dtype=np.float32) for _ in batch.slots],
                StepTimes(steps=batch.key.steps))

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        return len(prompt.split())


def slow_factory(runner: SlowRunner) -> Any:
    info = ModelInfo(id="fake", source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=True, created=0)

    def build(settings: Any, metrics: Any) -> Engine:
        cfg: EngineConfig = settings.engine_config()
        return Engine(cfg, metrics, runner_factory=lambda _c: (runner, info))

    return build


def test_cancel_runsync_timeout_purge_and_429(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    import runpod

    runner = SlowRunner()
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner), job_concurrency=1,
                             job_queue_max=2, max_batch_images=1) as live:
        runner.delay = 10.0
        url = f"{live.url}/v2/ep"
        inp = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
        # runsync whose wait runs out: IN_PROGRESS, the client then polls.
        t0 = time.monotonic()
        first = httpx.post(f"{url}/runsync?wait=1000", json={"input": inp}, timeout=120).json()
        assert time.monotonic() - t0 < 9, "runsync?wait=1000 did not return before the job ended"
        assert first == {"id": first["id"], "status": "IN_PROGRESS"}
        queued = [httpx.post(f"{url}/run", json={"input": inp}, timeout=120).json() for _ in range(2)]
        assert [q["status"] for q in queued] == ["IN_QUEUE", "IN_QUEUE"]
        r = httpx.post(f"{url}/run", json={"input": inp}, timeout=120)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        # SDK cancel of a queued job, then purge the other.
        monkeypatch.setattr(runpod, "endpoint_url_base", live.url + "/v2")
        monkeypatch.setattr(runpod, "api_key", "anything")
        from runpod.endpoint.runner import Job as SdkJob
        from runpod.endpoint.runner import RunPodClient

        sdk_job = SdkJob("ep", queued[0]["id"], RunPodClient())
        assert sdk_job.cancel() == {"id": queued[0]["id"], "status": "CANCELLED"}
        assert httpx.post(f"{url}/purge-queue", timeout=120).json() == {"removed": 1, "status": "completed"}
        assert httpx.get(f"{url}/status/{queued[1]['id']}", timeout=120).status_code == 404
        # Cancel the running one: the engine drops it.
        r = httpx.post(f"{url}/cancel/{first['id']}", timeout=120).json()
        assert r == {"id": first["id"], "status": "CANCELLED"}
        assert wait_status(live, first["id"], ("CANCELLED",))["status"] == "CANCELLED"
        health = httpx.get(f"{url}/health", timeout=120).json()
        assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0


def test_job_waiting_in_the_engine_queue_is_in_queue_and_purgeable(tmp_path: Any) -> None:
    runner = SlowRunner()
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner), job_concurrency=4,
                             max_batch_images=1) as live:
        runner.delay = 10.0
        url = f"{live.url}/v2/ep"
        inp = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
        running = httpx.post(f"{url}/run", json={"input": inp}, timeout=120).json()
        assert wait_status(live, running["id"], ("IN_PROGRESS",))["status"] == "IN_PROGRESS"
        waiting = httpx.post(f"{url}/run", json={"input": inp}, timeout=120).json()
        # Handed to the engine (job concurrency 4) but behind the running batch: IN_QUEUE.
        deadline = time.monotonic() + 60
        while live.app.state.ctx.jobs.running < 2:
            assert time.monotonic() < deadline, "the second job never reached the engine"
            time.sleep(0.05)
        body = httpx.get(f"{url}/status/{waiting['id']}", timeout=120).json()
        assert body["status"] == "IN_QUEUE"
        purged = httpx.post(f"{url}/purge-queue", timeout=120).json()
        assert purged == {"removed": 1, "status": "completed"}
        assert wait_status(live, waiting["id"], ("CANCELLED",))["status"] == "CANCELLED"
        httpx.post(f"{url}/cancel/{running['id']}", timeout=120)


class GateRunner(SlowRunner):
    """Holds batches whose prompt is ``hold`` until ``gate`` is set (or all their requests
    are cancelled); other batches finish at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        if any(s.ticket.prompt == "hold" for s in batch.slots):
            while not self.gate.wait(0.01):
                if batch.all_abandoned():
                    raise Cancelled("cancelled")
        return super().run(batch)


def test_execution_timeout_and_times_count_from_the_engine_start(tmp_path: Any) -> None:
    """A job waiting in the engine's queue is IN_QUEUE everywhere (status, health) and its
    execution timeout has not started; delayTime / executionTime split at the real start."""
    runner = GateRunner()
    inp = {"width": 64, "height": 64, "refiner_inference_steps": 4}
    # Server-wide execution timeout of 1 s (RunPod's policy cannot go under 5 s).
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner), job_concurrency=4,
                             max_batch_images=1, job_execution_timeout_s=1.0) as live:
        url = f"{live.url}/v2/ep"
        slow = httpx.post(f"{url}/run", json={"input": {"prompt": "hold", **inp},
                                              "policy": {"executionTimeout": 120_000}},
                          timeout=120).json()
        assert wait_status(live, slow["id"], ("IN_PROGRESS",))["status"] == "IN_PROGRESS"
        submitted = time.monotonic()
        waiting = [httpx.post(f"{url}/run", json={"input": {"prompt": "quick", **inp}},
                              timeout=120).json()["id"] for _ in range(3)]
        deadline = time.monotonic() + 60
        while live.app.state.ctx.jobs.running < 4:
            assert time.monotonic() < deadline, "the jobs never reached the engine"
            time.sleep(0.02)
        running = httpx.get(f"{url}/status/{slow['id']}", timeout=120).json()
        assert running["workerId"] and running["delayTime"] >= 0
        for job_id in waiting:
            body = httpx.get(f"{url}/status/{job_id}", timeout=120).json()
            assert body == {"id": job_id, "status": "IN_QUEUE"}  # no worker, no times yet
        health = httpx.get(f"{url}/health", timeout=120).json()["jobs"]
        assert (health["inQueue"], health["inProgress"]) == (3, 1), health
        # Well past their 1 s execution timeout, they are still waiting, not TIMED_OUT.
        while time.monotonic() - submitted < 2.0:
            body = httpx.get(f"{url}/status/{waiting[0]}", timeout=120).json()
            assert body["status"] == "IN_QUEUE", body
            time.sleep(0.1)
        runner.gate.set()
        for job_id in waiting:
            body = wait_status(live, job_id, ("COMPLETED", "FAILED", "TIMED_OUT"))
            assert body["status"] == "COMPLETED", body
            # The wait behind the slow job (past the 1 s timeout) is delay; the run alone is
            # execution.
            assert body["delayTime"] > 1000 and body["executionTime"] < 1500, body
        # A job that runs past its timeout still times out, counted from its start.
        runner.gate.clear()
        late = httpx.post(f"{url}/run", json={"input": {"prompt": "hold", **inp}},
                          timeout=120).json()
        body = wait_status(live, late["id"], ("TIMED_OUT", "COMPLETED", "FAILED"))
        assert body["status"] == "TIMED_OUT", body
        assert "execution timeout of 1s" in body["error"]
        assert 900 <= body["executionTime"] < 10_000, body
        health = httpx.get(f"{url}/health", timeout=120).json()["jobs"]
        assert (health["completed"], health["failed"]) == (4, 1), health  # the slow one too


def test_a_job_may_run_past_the_synchronous_request_timeout(tmp_path: Any) -> None:
    """--request-timeout-s bounds synchronous requests; a job is bounded by its own timeout."""
    runner = GateRunner()
    inp = {"prompt": "hold", "width": 64, "height": 64, "refiner_inference_steps": 4}
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner),
                             request_timeout_s=1.0, max_batch_images=1) as live:
        url = f"{live.url}/v2/ep"
        job = httpx.post(f"{url}/run", json={"input": inp}, timeout=120).json()
        assert wait_status(live, job["id"], ("IN_PROGRESS",))["status"] == "IN_PROGRESS"
        began = time.monotonic()
        # Well past the 1 s request timeout (it used to end the job there), still running.
        while time.monotonic() - began < 2.5:
            body = httpx.get(f"{url}/status/{job['id']}", timeout=120).json()
            assert body["status"] == "IN_PROGRESS", body
            time.sleep(0.1)
        runner.gate.set()
        body = wait_status(live, job["id"], ("COMPLETED", "FAILED", "TIMED_OUT"))
        assert body["status"] == "COMPLETED", body
        assert body["executionTime"] > 2000, body


def test_missing_results_and_long_unknown_ids_are_404s(rp: serving.LiveServer) -> None:
    """A completed job whose files are gone answers like an expired one (404, never a 500);
    an unknown id is quoted in the 404 only up to 64 characters."""
    import shutil

    done = runsync(rp, {"prompt": "x", **SMALL})
    assert done["status"] == "COMPLETED"
    shutil.rmtree(rp.app.state.ctx.jobs.store.results_dir / done["id"])
    r = httpx.get(f"{rp.url}/v2/ep/status/{done['id']}", headers=AUTH, timeout=120)
    assert r.status_code == 404, r.text
    assert r.json()["status"] == "FAILED" and "results are gone" in r.json()["error"]
    long_id = "a" * 5000
    r = httpx.get(f"{rp.url}/v2/ep/status/{long_id}", headers=AUTH, timeout=120)
    assert r.status_code == 404
    assert f"job {'a' * 64}… not found" in r.json()["error"] and len(r.text) < 300


def test_restart_runs_queued_and_requeues_interrupted_jobs(tmp_path: Any) -> None:
    runner = SlowRunner()
    inp = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner)) as live:
        done = httpx.post(f"{live.url}/v2/ep/runsync", json={"input": inp}, timeout=120).json()
        assert done["status"] == "COMPLETED"
    # Jobs the first server left queued and running (written as a crash would leave them).
    store = job_store(tmp_path / "data")
    store.open()
    now = time.time()
    left = {"queued": ("queued", 0, "dead-server", None),
            "running": (RUNNING, 0, "dead-server", now),
            "twice": (RUNNING, 1, "dead-server", now),
            # Taken but still waiting in the engine's queue: not an interruption of its own.
            "waited": (RUNNING, 1, "dead-server", None),
            # Left running by an earlier run of the restarted server itself (a fixed replica id,
            # whose heartbeat the new run renews at once).
            "own": (RUNNING, 0, "worker-a", now)}
    for name, (status, requeues, worker, started) in left.items():
        store.create(Job(id=name, dialect="runpod", scope="anonymous/ep",
                         payload={"input": inp}, status=status, created_at=now,
                         expires_at=now + 3600, worker_id=worker, requeues=requeues,
                         started_at=started))
    store.close()
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                             replica_id="worker-a") as live:
        again = httpx.get(f"{live.url}/v2/ep/status/{done['id']}", timeout=120).json()
        assert again["status"] == "COMPLETED"
        assert again["output"] == done["output"]
        # Nothing accepted is lost: the queued job runs, the interrupted ones run again once.
        for name in ("queued", "running", "waited", "own"):
            body = wait_status(live, name, ("COMPLETED", "FAILED"), timeout=120)
            assert body["status"] == "COMPLETED", (name, body)
        # Interrupted a second time: failed, saying why.
        body = httpx.get(f"{live.url}/v2/ep/status/twice", timeout=120).json()
        assert body["status"] == "FAILED", body
        assert "re-queued once" in body["error"]


def test_bounds_on_steps_and_prompts(rp: serving.LiveServer) -> None:
    """Issue 11.2: refiner steps are bounded by --max-steps; prompts by 2,000 characters."""
    max_steps = rp.settings.max_steps
    t0 = time.monotonic()
    body = runsync(rp, {**SMALL, "prompt": "x", "refiner_inference_steps": 10**7})
    assert body["status"] == "FAILED", body
    assert "refiner_inference_steps" in body["error"] and str(max_steps) in body["error"]
    body = runsync(rp, {**SMALL, "prompt": "x", "num_inference_steps": max_steps + 1})
    assert body["status"] == "FAILED" and "num_inference_steps" in body["error"]
    for field in ("prompt", "negative_prompt"):
        body = runsync(rp, {**SMALL, "prompt": "x", field: "y" * 2001})
        assert body["status"] == "FAILED", body
        assert body["error"].startswith(f"{field} does not meet") and "2000" in body["error"]
    assert runsync(rp, {**SMALL, "prompt": "y" * 2000})["status"] == "COMPLETED"
    assert time.monotonic() - t0 < 60, "refused inputs must not reach the engine"


def test_retry_is_capped(rp: serving.LiveServer) -> None:
    """Issue 11.5: one job may be retried 3 times; the 4th is refused in RunPod's envelope."""
    url = f"{rp.url}/v2/ep"
    failed = httpx.post(f"{url}/runsync", headers=AUTH,
                        json={"input": {"prompt": "x", "nope": 1}}, timeout=120).json()
    assert failed["status"] == "FAILED"
    for attempt in range(3):
        r = httpx.post(f"{url}/retry/{failed['id']}", headers=AUTH, timeout=120)
        assert r.status_code == 200, (attempt, r.text)
        body = wait_status(rp, failed["id"], ("FAILED",), timeout=120)
        assert body["status"] == "FAILED", f"retry {attempt + 1} did not fail again: {body}"
    r = httpx.post(f"{url}/retry/{failed['id']}", headers=AUTH, timeout=120)
    assert r.status_code == 400, r.text
    assert "retried 3 times" in r.json()["error"]


def test_retry_counts_against_the_daily_quota(tmp_path: Any, capsys: pytest.CaptureFixture
                                              ) -> None:
    """Issue 11.5: /retry is a request: it spends quota and is refused once the quota is spent."""
    import re

    from gateway.cli import main as cli

    keys_file = tmp_path / "keys.json"
    assert cli(["keys", "create", "--keys-file", str(keys_file), "--id", "d", "--daily", "2"]) == 0
    key = dict(re.findall(r"^(\w+):\s+(\S+)$", capsys.readouterr().out, re.M))["api_key"]
    headers = {"authorization": key}
    with serving.live_server(tmp_path, engine_factory=slow_factory(SlowRunner()),
                             keys_file=str(keys_file)) as live:
        url = f"{live.url}/v2/ep"
        failed = httpx.post(f"{url}/runsync", headers=headers, timeout=60,
                            json={"input": {"prompt": "x", "nope": 1}}).json()
        assert failed["status"] == "FAILED"
        assert httpx.post(f"{url}/retry/{failed['id']}", headers=headers, timeout=120).status_code == 200
        body = wait_status_h(live, failed["id"], headers)
        assert body["status"] == "FAILED", body
        r = httpx.post(f"{url}/retry/{failed['id']}", headers=headers, timeout=120)
        assert r.status_code == 429, r.text
        assert "daily limit reached" in r.json()["error"]


def wait_status_h(live: serving.LiveServer, job_id: str, headers: dict[str, str],
                  timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{live.url}/v2/ep/status/{job_id}", headers=headers, timeout=120).json()
        if body["status"] in ("FAILED", "COMPLETED"):
            return body
        assert time.monotonic() < deadline, f"job {job_id} still {body['status']} after {timeout}s"
        time.sleep(0.05)


def test_run_during_drain_is_503(tmp_path: Any) -> None:
    """Issue 11.6: /run and /runsync answer 503 + Retry-After while the server drains."""
    import asyncio

    runner = SlowRunner(delay=2.0)
    with serving.live_server(tmp_path, engine_factory=slow_factory(runner)) as live:
        url = f"{live.url}/v2/ep"
        inp = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
        busy = httpx.post(f"{url}/run", json={"input": inp}, timeout=120).json()
        assert wait_status(live, busy["id"], ("IN_PROGRESS",), timeout=120)["status"] == \
            "IN_PROGRESS"
        loop = live.app.state.ctx.jobs._loops[0].get_loop()
        drained = asyncio.run_coroutine_threadsafe(live.engine.drain(60), loop)
        deadline = time.monotonic() + 60
        while live.engine.state.value != "draining" and not drained.done():
            assert time.monotonic() < deadline, "the engine never started draining"
            time.sleep(0.01)
        for path in ("run", "runsync"):
            r = httpx.post(f"{url}/{path}", json={"input": inp}, timeout=120)
            assert r.status_code == 503, (path, r.text)
            assert int(r.headers["retry-after"]) >= 1
            assert "shutting down" in r.json()["error"]
        drained.result(timeout=120)


def test_completed_jobs_are_charged_to_the_submitting_key(rp: serving.LiveServer) -> None:
    ledger = rp.app.state.ctx.ledger

    def images() -> int:
        return sum(row.images for row in ledger.rows(client="env-key-1"))

    before = images()
    out = runsync(rp, {"prompt": "ledger", "num_images": 2, **SMALL})
    assert out["status"] == "COMPLETED"
    assert images() == before + 2
