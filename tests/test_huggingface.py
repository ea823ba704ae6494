"""Hugging Face text-to-image dialect, through the real ``huggingface_hub.InferenceClient``.

Happy paths run tiny-sdxl over a real socket; error cases use httpx so the exact status, body and
headers can be asserted, and the loading case uses a fake runner whose load is held.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from auth.keys import KeysFile, new_client, save_keys_file
from inference import Engine, EngineConfig, ModelInfo
from observability.metrics import Metrics
from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(autouse=True)
def _client_online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE so nothing loads from the hub; huggingface_hub's offline
    mode also blocks its InferenceClient, even towards a loopback URL. Servers are started (and
    their models loaded from local files) before this runs."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_inference_client_endpoint_root(keyed_server):
    client = InferenceClient(model=keyed_server.url + "/", token="test-key")
    image = client.text_to_image("a lighthouse at dusk", negative_prompt="blurry", width=96,
                                 height=64, num_inference_steps=2, guidance_scale=5.0, seed=7)
    assert image.size == (96, 64)
    again = client.text_to_image("a lighthouse at dusk", negative_prompt="blurry", width=96,
                                 height=64, num_inference_steps=2, guidance_scale=5.0, seed=7)
    assert again.tobytes() == image.tobytes(), "the same seed must give the same image"


def test_inference_client_api_inference_style_and_openai_get_still_works(server):
    model_id = server.engine.info.id
    client = InferenceClient(model=f"{server.url}/models/{model_id}")
    image = client.text_to_image("a red cube", width=64, height=64, num_inference_steps=2,
                                 scheduler="DPMSolverMultistepScheduler", seed=1)
    assert image.size == (64, 64)
    openai_view = httpx.get(f"{server.url}/models/{model_id}")
    assert openai_view.status_code == 200 and openai_view.json()["object"] == "model"


def test_unknown_model_id_is_a_404_in_hf_envelope(server):
    client = InferenceClient(model=server.url + "/models/stabilityai/sdxl-turbo")
    with pytest.raises(HfHubHTTPError) as err:
        client.text_to_image("x", **FAST)
    assert err.value.response.status_code == 404
    body = err.value.response.json()
    assert set(body) == {"error"} and "stabilityai/sdxl-turbo" in body["error"]
    single = httpx.post(server.url + "/models/nope", json={"inputs": "x"})
    assert single.status_code == 404 and set(single.json()) == {"error"}


@pytest.mark.parametrize(("accept", "media_type", "magic"), [
    ("image/jpeg", "image/jpeg", b"\xff\xd8"),
    ("image/webp", "image/webp", b"RIFF"),
    ("image/png", "image/png", b"\x89PNG"),
    ("image/*", "image/png", b"\x89PNG"),
    ("image/tiff, image/webp;q=0.5, image/jpeg;q=0.9", "image/jpeg", b"\xff\xd8"),
])
def test_accept_picks_the_format(server, accept, media_type, magic):
    resp = httpx.post(server.url + "/", json={"inputs": "x", "parameters": FAST},
                      headers={"accept": accept}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == media_type
    assert resp.content.startswith(magic)
    assert Image.open(io.BytesIO(resp.content)).size == (64, 64)


def test_parameters_form_without_accept_preference_is_raw_png(server):
    resp = httpx.post(server.url + "/", json={"inputs": "x", "parameters": FAST}, timeout=120)
    assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")


def test_seed_custom_handler_form_answers_base64_json(server):
    # Exactly the seed page's request: flat fields, inference_steps, requests' Accept */*.
    body = {"inputs": "Positive prompt", "negative_prompt": "Negative prompt goes here",
            "height": 64, "width": 128, "guidance_scale": 7.5, "inference_steps": 2}
    resp = httpx.post(server.url + "/", json=body, headers={"accept": "*/*"}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    data = resp.json()
    assert set(data) == {"image"}
    assert Image.open(io.BytesIO(base64.b64decode(data["image"]))).size == (128, 64)
    # Accept: application/json asks for the same body with the parameters form too.
    resp = httpx.post(server.url + "/predict", json={"inputs": "x", "parameters": FAST},
                      headers={"accept": "application/json"}, timeout=120)
    assert resp.status_code == 200 and set(resp.json()) == {"image"}


def test_old_spec_target_size_and_negative_prompt_list(server):
    body = {"inputs": "x", "parameters": {"target_size": {"width": 80, "height": 64},
                                          "negative_prompt": ["blurry", "dark"],
                                          "num_inference_steps": 2}}
    resp = httpx.post(server.url + "/", json=body, headers={"accept": "image/png"}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert Image.open(io.BytesIO(resp.content)).size == (80, 64)


@pytest.mark.parametrize(("body", "field"), [
    ({"inputs": "x", "parameters": {"width": 100, "height": 64}}, "width"),
    ({"inputs": "x", "parameters": {"width": 64, "height": 99999}}, "height"),
    ({"inputs": "x", "parameters": {"num_inference_steps": 10_000}}, "num_inference_steps"),
    ({"inputs": "x", "inference_steps": 2_000}, "inference_steps"),  # the handler form's name
    ({"inputs": "x", "parameters": {"seed": -1}}, "parameters.seed"),
    ({"inputs": "x", "parameters": {"guidance_scale": "high"}}, "parameters.guidance_scale"),
    ({"inputs": "x", "parameters": {"scheduler": "NoSuchScheduler"}}, "scheduler"),
    ({"inputs": "x" * 40_000}, "inputs"),
    ({"inputs": "   "}, "inputs"),
    ({"parameters": {}}, "inputs"),
])
def test_bad_fields_are_400_naming_the_field(server, body, field):
    resp = httpx.post(server.url + "/", json=body, headers={"accept": "image/png"})
    assert resp.status_code == 400, resp.text
    data = resp.json()
    assert set(data) == {"error"} and field in data["error"]
    assert "num_inference_steps" not in data["error"] or "num_inference_steps" in str(body)


def test_the_client_raises_with_the_server_message(server):
    client = InferenceClient(model=server.url)
    with pytest.raises(HfHubHTTPError) as err:
        client.text_to_image("x", width=100, height=64, num_inference_steps=2)
    assert err.value.response.status_code == 400
    assert "width must be a multiple of 8" in str(err.value)


def test_unsupported_accept_is_406(server):
    resp = httpx.post(server.url + "/", json={"inputs": "x"}, headers={"accept": "image/tiff"})
    assert resp.status_code == 406 and "Accept" in resp.json()["error"]
    anything_json = httpx.post(server.url + "/", json={"inputs": "x", "parameters": FAST},
                               headers={"accept": "application/*"}, timeout=120)
    assert anything_json.status_code == 200, anything_json.text
    assert set(anything_json.json()) == {"image"}


def test_a_wrong_method_on_the_custom_handler_route_is_answered_in_hf_shape(server):
    resp = httpx.get(server.url + "/predict")
    assert resp.status_code == 405 and set(resp.json()) == {"error"}, resp.text


def test_openai_routes_keep_their_envelope(server):
    # A POST path only Hugging Face serves must not change OpenAI's errors elsewhere.
    resp = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "size": "7x7"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "size"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Fake-runner server with keys: a full client, an OpenAI-only one and a slow one."""
    tmp = tmp_path_factory.mktemp("hf")
    full, full_key, _ = new_client("full")
    only_openai, oo_key, _ = new_client("only-openai", scopes=["openai"])
    slow, slow_key, _ = new_client("slow", rps=0.1)
    keys_file = tmp / "keys.json"
    save_keys_file(keys_file, KeysFile(clients=[full, only_openai, slow]))
    runner = FakeRunner()
    with live_server(tmp, keys_file=str(keys_file), max_body_bytes=4096,
                     engine_factory=engine_factory(runner)) as live:
        live.keys = {"full": full_key, "only-openai": oo_key, "slow": slow_key}
        yield live


def post(live, key: str | None, body: object, path: str = "/", **kw) -> httpx.Response:
    headers = {"accept": "image/png"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(live.url + path, json=body, headers=headers, timeout=60, **kw)


def test_auth_scope_size_and_quota_errors(guarded):
    ok = post(guarded, guarded.keys["full"], {"inputs": "x"})
    assert ok.status_code == 200 and ok.content.startswith(b"\x89PNG")
    missing = post(guarded, None, {"inputs": "x"})
    assert missing.status_code == 401 and set(missing.json()) == {"error"}
    wrong = post(guarded, "not-a-key", {"inputs": "x"}, path="/models/fake")
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]
    scoped = post(guarded, guarded.keys["only-openai"], {"inputs": "x"})
    assert scoped.status_code == 403 and "hf" in scoped.json()["error"]
    big = post(guarded, guarded.keys["full"], {"inputs": "x" * 5000})
    assert big.status_code == 413 and set(big.json()) == {"error"}
    first = post(guarded, guarded.keys["slow"], {"inputs": "x"})
    assert first.status_code == 200
    limited = post(guarded, guarded.keys["slow"], {"inputs": "x"})
    assert limited.status_code == 429 and set(limited.json()) == {"error"}
    assert int(limited.headers["retry-after"]) >= 1
    by_id = post(guarded, guarded.keys["full"], {"inputs": "x"}, path="/models/fake")
    assert by_id.status_code == 200
    rows = guarded.app.state.ctx.ledger.rows("full")
    assert sum(r.requests for r in rows) == 2 and sum(r.images for r in rows) == 2


def test_queue_full_is_429_with_retry_after(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner, max_queue_images=1)) as live:
        runner.hold()
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(post(live, None, {"inputs": "a"})))
        second = threading.Thread(target=lambda: results.append(post(live, None, {"inputs": "b"})))
        first.start()
        try:
            assert runner.entered.wait(60), "the first request never reached the runner"
            second.start()
            wait_for(lambda: live.engine.queued_images >= 1, "the second request to queue")
            third = post(live, None, {"inputs": "c"})
            assert third.status_code == 429 and set(third.json()) == {"error"}
            assert int(third.headers["retry-after"]) >= 1
        finally:
            runner.release()
            for thread in (first, second):
                if thread.is_alive():
                    thread.join(60)
        assert [r.status_code for r in results] == [200, 200]


def test_503_with_estimated_time_while_loading(tmp_path):
    release = threading.Event()
    runner = FakeRunner()
    info = ModelInfo(id="slow", source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=False, created=0)

    def slow_factory(_cfg):
        release.wait(30)
        return runner, info

    def build(settings, metrics: Metrics) -> Engine:
        return Engine(EngineConfig(), metrics, runner_factory=slow_factory)

    with live_server(tmp_path, engine_factory=build, wait_ready=False) as live:
        try:
            client = InferenceClient(model=live.url)
            with pytest.raises(HfHubHTTPError) as err:
                client.text_to_image("early")
            resp = err.value.response
            assert resp.status_code == 503
            body = resp.json()
            assert "currently loading" in body["error"] and body["estimated_time"] > 0
            assert int(resp.headers["retry-after"]) >= 1
        finally:
            release.set()
        wait_for(lambda: httpx.get(live.url + "/ready").status_code == 200, "the model to load")
        assert client.text_to_image("now").size == (64, 64)
