"""The OpenAI Images API through the real ``openai`` SDK over a socket."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

FAST = {"num_inference_steps": 2}


def client(url: str, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, **kw)


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_b64_images_have_requested_size(server, suffix):
    resp = client(server.url + suffix).images.generate(
        prompt="a lighthouse", size="128x64", n=1, response_format="b64_json", extra_body=FAST
    )
    assert len(resp.data) == 1
    img = png(resp.data[0].b64_json)
    assert img.size == (128, 64)
    assert resp.created > 0
    assert resp.usage is not None and resp.usage.output_tokens == (128 // 16) * (64 // 16)
    assert resp.usage.input_tokens > 0


def test_url_mode_serves_the_image(server):
    resp = client(server.url + "/v1").images.generate(prompt="a fox", size="64x64", extra_body=FAST)
    url = resp.data[0].url
    assert url and url.startswith(server.url + "/media/")
    assert resp.data[0].b64_json is None
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    missing = httpx.get(server.url + "/media/" + "A" * 32 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_n2_gives_two_different_images_and_seed_repeats(server):
    c = client(server.url)
    kw = dict(prompt="two birds", size="64x64", n=2, response_format="b64_json",
              extra_body={**FAST, "seed": 1234})
    first = c.images.generate(**kw)
    again = c.images.generate(**kw)
    a, b = (d.b64_json for d in first.data)
    assert a != b
    assert [d.b64_json for d in again.data] == [a, b]
    # Image i of seed s is image 0 of seed s+i.
    shifted = c.images.generate(**{**kw, "n": 1, "extra_body": {**FAST, "seed": 1235}})
    assert shifted.data[0].b64_json == b


def test_gpt_image_models_default_to_b64_and_jpeg_works(server):
    resp = client(server.url).images.generate(
        model="gpt-image-1", prompt="x", size="64x64", output_format="jpeg",
        output_compression=50, extra_body=FAST,
    )
    data = base64.b64decode(resp.data[0].b64_json)
    assert data[:3] == b"\xff\xd8\xff"
    assert resp.output_format == "jpeg"


def test_models_list_says_noise(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == ["tiny-sdxl"]
    assert "noise" in models.data[0].model_extra["description"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": "two"}, "n"),
        ({"prompt": "", "n": 1}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "size": "huge"}, "size"),
        ({"prompt": "x", "size": "100x100"}, "size"),
        ({"prompt": "x", "size": "8192x8192"}, "size"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "model": "midjourney"}, "model"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "extra_body": {"sampler": "Nope"}}, "sampler"),
        ({"prompt": "x", "extra_body": {"seed": -1}}, "seed"),
        ({"prompt": "x", "extra_body": {"num_inference_steps": 100000}}, "num_inference_steps"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"prompt": "x", "extra_body": {"negative_prompt": "x" * 32001}}, "negative_prompt"),
        ({"prompt": "x", "size": "9" * 5000 + "x64"}, "size"),
        ({"prompt": "x", "n": 1.5}, "n"),
    ],
)
def test_bad_input_is_a_400_naming_the_param(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(server.url).images.generate(**kwargs)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"
    assert err.value.body["message"]


def test_unknown_sampler_lists_the_valid_ones(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server.url).images.generate(prompt="x", extra_body={"sampler": "Nope"})
    assert "Euler a" in err.value.message and "K_EULER" in err.value.message


def test_malformed_json_and_framework_errors_keep_the_envelope(server):
    r = httpx.post(server.url + "/v1/images/generations", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code", "request_id"}
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = httpx.get(server.url + "/v1/images/generations")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    big = b'{"prompt": "' + b"x" * (server.settings.max_body_bytes + 10) + b'"}'
    r = httpx.post(server.url + "/v1/images/generations", content=big,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_missing_and_bad_keys_are_401(keyed_server):
    with pytest.raises(openai.AuthenticationError) as err:
        client(keyed_server.url, key="wrong").images.generate(prompt="x", extra_body=FAST)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    r = httpx.post(keyed_server.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] is None
    ok = client(keyed_server.url, key="test-key").images.generate(
        prompt="x", size="64x64", response_format="b64_json", extra_body=FAST)
    assert png(ok.data[0].b64_json).size == (64, 64)
    # Health and metrics stay open.
    assert httpx.get(keyed_server.url + "/health").status_code == 200


def test_ready_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_whole_number_floats_are_accepted(server):
    r = httpx.post(server.url + "/v1/images/generations", timeout=120,
                   json={"prompt": "x", "n": 1.0, "size": "64x64", "num_inference_steps": 2.0,
                         "seed": 7.0, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1 and r.json()["data"][0]["seed"] == 7


def test_every_image_reports_its_seed(server):
    resp = client(server.url).images.generate(
        prompt="seeds", size="64x64", n=2, response_format="b64_json",
        extra_body={**FAST, "seed": 40})
    assert [d.model_extra["seed"] for d in resp.data] == [40, 41]
    drawn = client(server.url).images.generate(prompt="seeds", size="64x64", extra_body=FAST)
    assert isinstance(drawn.data[0].model_extra["seed"], int)


@pytest.mark.parametrize("name", ["tiny-sdxl", "dall-e-2", "dall-e-3", "gpt-image-1"])
def test_every_accepted_model_name_can_be_retrieved(server, name):
    model = client(server.url).models.retrieve(name)
    assert model.id == name


def test_a_hub_id_model_can_be_retrieved_as_listed(tmp_path):
    """Served from a hub id (org/name): the SDK sends /models/org%2Fname, decoded to a slash."""
    with live_server(tmp_path, engine_factory=engine_factory(FakeRunner(),
                                                             model_id="acme/tiny")) as live:
        c = client(live.url)
        (listed,) = [m.id for m in c.models.list() if "/" in m.id]
        assert listed == "acme/tiny"
        assert c.models.retrieve(listed).id == "acme/tiny"
        with pytest.raises(openai.NotFoundError) as err:
            c.models.retrieve("acme/other")
        assert err.value.code == "model_not_found"


def test_unknown_model_retrieve_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        client(server.url).models.retrieve("midjourney")
    assert err.value.code == "model_not_found"
