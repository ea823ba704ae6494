"""Hostile bodies and HTTP details (issue 11: items 3, 10, 14, 16), over real sockets."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import openai
import pytest

from auth.keys import KeysFile, KeyStore, new_client, save_keys_file
from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

SD_XL = "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/sd_xl"
DEEP = 100_000

# Each of these answered 500 (OpenAI, RunPod) or error_code 336000 (Baidu) before.
HOSTILE = {
    "invalid UTF-8 in a string": b'{"prompt": "\xff\xfe"}',
    "latin-1 text": b'{"prompt": "caf\xe9"}',
    "deeply nested arrays": b'{"prompt": "x", "extra": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deeply nested objects": b'{"prompt": "x", "extra": ' + b'{"a": ' * DEEP + b"1"
    + b"}" * DEEP + b"}",
    "a size of 5,000 digits": b'{"prompt": "x", "size": "' + b"9" * 5000 + b'x64"}',
    "both sides 5,000 digits": b'{"prompt": "x", "size": "' + b"9" * 5000 + b"x"
    + b"9" * 5000 + b'"}',
    "invalid UTF-8 inside input": b'{"input": {"prompt": "\xff"}}',
}
POST_ROUTES = ["/v1/images/generations", "/images/generations", SD_XL, "/oauth/2.0/token",
               "/v2/ep/run", "/v2/ep/runsync"]


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_bodies_never_get_a_5xx(server, kind):
    body = HOSTILE[kind]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for route in POST_ROUTES:
            for ctype in ("application/json", "application/x-www-form-urlencoded"):
                r = c.post(route, content=body, headers={"content-type": ctype})
                assert r.status_code < 500, f"{kind} on {route} ({ctype}): {r.status_code} {r.text}"
                if route.startswith("/v1/images") and ctype == "application/json":
                    assert r.status_code == 400, (kind, r.text)
                    assert r.json()["error"]["type"] == "invalid_request_error"
                if route == SD_XL:
                    assert r.status_code == 200
                    assert r.json()["error_code"] in (336002, 336003), (kind, ctype, r.text)


def test_a_body_with_a_byte_order_mark_is_read_like_one_without(server):
    # Python's json (so every FastAPI server) skips a leading UTF-8 BOM; some Windows tools
    # write one.
    body = b"\xef\xbb\xbf" + json.dumps({"prompt": "x", "size": "64x64", "n": 1,
                                          "response_format": "b64_json"}).encode()
    r = httpx.post(server.url + "/v1/images/generations", content=body,
                   headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server.url + "/v1/images/generations")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
    r = httpx.delete(server.url + "/health")
    assert r.status_code == 405 and {"GET", "HEAD"} <= set(r.headers["allow"].split(", "))


@pytest.mark.parametrize("path", ["/health", "/ready", "/startup", "/v1/models",
                                  "/v2/ep/health", "/sdapi/v1/samplers", "/metrics", "/docs"])
def test_head_is_answered_like_get_without_a_body(server, path):
    # HTTP asks every general-purpose server to answer HEAD wherever it answers GET.
    get = httpx.get(server.url + path)
    head = httpx.head(server.url + path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert get.headers["content-type"].count("charset") <= 1, get.headers["content-type"]


@pytest.mark.parametrize("path", ["/v2/ep/stream/some-job", "/sdapi/v1/progress"])
def test_get_routes_that_do_something_refuse_head(server, path):
    # A RunPod stream read delivers the output once; A1111's progress can skip an image.
    r = httpx.head(server.url + path)
    assert r.status_code == 405 and "GET" in r.headers["allow"], (r.status_code, r.headers)


def test_probes_and_scrapes_log_at_debug_and_requests_at_info(server, caplog):
    # A kubelet probes every few seconds and Prometheus scrapes; at INFO they would bury the
    # requests an operator reads the access log for.
    caplog.set_level(logging.DEBUG, logger="imagegate.access")
    ids = {f"probe{path.replace('/', '-')}": path
           for path in ("/health", "/ready", "/startup", "/metrics")}
    ids["req-models"] = "/v1/models"
    for rid, path in ids.items():
        assert httpx.get(server.url + path, headers={"x-request-id": rid}).status_code == 200
    head = httpx.head(server.url + "/ready", headers={"x-request-id": "probe-head"})
    assert head.status_code == 200
    ids["probe-head"] = "/ready"

    def levels() -> dict[str, int]:
        return {r.fields["request_id"]: r.levelno for r in caplog.records
                if r.name == "imagegate.access" and hasattr(r, "fields")}

    _wait(lambda: set(ids) <= set(levels()), "an access line for every request")
    seen = levels()
    assert seen.pop("req-models") == logging.INFO
    assert {seen[rid] for rid in ids if rid != "req-models"} == {logging.DEBUG}, seen


def test_a_compressed_body_is_a_415_naming_content_encoding(server):
    import gzip

    body = gzip.compress(json.dumps({"prompt": "x", "size": "64x64"}).encode())
    r = httpx.post(server.url + "/v1/images/generations", content=body,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert "Content-Encoding" in error["message"] and error["type"] == "invalid_request_error"
    plain = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "size": "1x1"},
                       headers={"content-encoding": "identity"})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "size", plain.text


def test_no_server_banner_and_nosniff(server):
    r = client_png(server)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "server" not in r.headers
    assert "server" not in httpx.get(server.url + "/health").headers


def client_png(server) -> httpx.Response:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    url = c.images.generate(prompt="a fox", size="64x64",
                            extra_body={"num_inference_steps": 2}).data[0].url
    assert url is not None
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    return got


def test_401_says_how_to_authenticate(keyed_server):
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(keyed_server.url + "/v1/images/generations", json={"prompt": "x"},
                       headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(keyed_server.url + "/oauth/2.0/token", params={
        "grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"})
    assert r.status_code == 401 and "www-authenticate" in r.headers


def test_internal_error_bodies_carry_the_request_id(server):
    r = httpx.post(server.url + "/v1/images/generations", content=b"{",
                   headers={"content-type": "application/json", "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["error"]["request_id"] == "abc-123"
    # An id that is not a plain token is replaced, not echoed into headers and logs.
    r = httpx.get(server.url + "/health", headers={"x-request-id": "a b\tc"})
    assert r.headers["x-request-id"] != "a b\tc" and len(r.headers["x-request-id"]) == 32


def test_admin_right_is_its_own_and_403s_never_say_none(tmp_path):
    keys_file = tmp_path / "keys.json"
    admin, admin_key, _ = new_client("ops", scopes=["baidu"], admin=True)
    user, user_key, _ = new_client("user", scopes=["baidu"])
    save_keys_file(keys_file, KeysFile(clients=[admin, user]))
    with live_server(tmp_path, engine_factory=engine_factory(FakeRunner()),
                     keys=KeyStore.from_config("", keys_file)) as srv:
        ok = httpx.get(srv.url + "/admin/usage", headers={"authorization": f"Bearer {admin_key}"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["object"] == "list"
        denied = httpx.get(srv.url + "/admin/usage",
                           headers={"authorization": f"Bearer {user_key}"})
        assert denied.status_code == 403
        assert "None" not in denied.json()["error"]["message"]
        assert "admin" in denied.json()["error"]["message"]
        wrong_api = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x"},
                               headers={"authorization": f"Bearer {user_key}"})
        assert wrong_api.status_code == 403
        assert "openai" in wrong_api.json()["error"]["message"]


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.05)


def test_startup_ready_and_health_through_the_life_of_a_server(tmp_path):
    from inference import Engine, EngineConfig, ModelInfo

    release = threading.Event()
    runner = FakeRunner()
    info = ModelInfo(id="slow", source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=False, created=0)

    def slow_factory(_cfg):
        assert release.wait(120), "test never released the model load"
        return runner, info

    def build(settings, metrics):
        return Engine(EngineConfig(), metrics, runner_factory=slow_factory)

    with live_server(tmp_path, engine_factory=build, wait_ready=False) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/startup").status_code == 503
        assert httpx.get(srv.url + "/ready").status_code == 503
        release.set()
        _wait(lambda: httpx.get(srv.url + "/startup").status_code == 200, "/startup to be 200")
        assert httpx.get(srv.url + "/ready").status_code == 200
        srv.engine.state = type(srv.engine.state).DRAINING
        assert httpx.get(srv.url + "/startup").status_code == 200
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert httpx.get(srv.url + "/health").status_code == 200


def test_a_model_that_fails_to_load_is_unhealthy_and_shows_no_paths(tmp_path):
    from inference import Engine, EngineConfig

    secret_path = "/srv/models/secret-folder/unet"

    def broken_factory(_cfg):
        raise FileNotFoundError(f"no weights in {secret_path}")

    def build(settings, metrics):
        return Engine(EngineConfig(), metrics, runner_factory=broken_factory)

    with live_server(tmp_path, engine_factory=build, wait_ready=False, api_keys="k",
                     model="/srv/models/secret-folder") as srv:
        _wait(lambda: httpx.get(srv.url + "/health").status_code == 503, "/health to turn 503")
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "/srv" not in ready.text
        detailed = httpx.get(srv.url + "/ready", headers={"authorization": "Bearer k"})
        assert secret_path in detailed.json()["error"]
