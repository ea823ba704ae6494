"""ModelsLab text2img: the real ``modelslab-py`` SDK over a socket (its ``Client.base_url``
pointed at the server), legacy string/"yes"-"no" bodies over plain HTTP, processing + fetch,
webhooks with track_id, refusals, and the canonical LoRA/scheduler translation.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest
from PIL import Image

from gateway.dialects.modelslab import (
    ModelsLabDialect,
    Text2ImgRequest,
    normalise,
    parse_loras,
    sampler_for,
)
from gateway.errors import ApiError
from inference import GenerationRequest
from inference.request import Lora
from inference.samplers import SamplerRegistry
from tests import fakes, serving

KEY = "test-key"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}


class Hooks:
    """A local receiver that records webhook POSTs."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.httpd.shutdown()


@pytest.fixture(scope="module")
def ml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    with serving.live_server(tmp_path_factory.mktemp("modelslab"), api_keys=KEY,
                             warmup_sizes="64x64", webhook_allow="127.0.0.1",
                             webhook_retry_delay_s=0.1, modelslab_wait_s=60) as live:
        yield live


@pytest.fixture
def community(ml: serving.LiveServer) -> Any:
    from modelslab_py.core.apis.community import Community
    from modelslab_py.core.client import Client

    client = Client(KEY, fetch_retry=120, fetch_timeout=1)
    client.base_url = ml.url + "/api/"
    return Community(client)


def image_size(url: str) -> tuple[int, int]:
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content)).size


def post(live: serving.LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, timeout=120)


def test_sdk_text_to_image_and_fetch(community: Any) -> None:
    from modelslab_py.schemas.community import Text2Image

    out = community.text_to_image(Text2Image(
        prompt="a red fox", negative_prompt="blurry", samples=2, seed=11,
        scheduler="DPMSolverMultistepScheduler", guidance_scale=6.5, **SMALL))
    assert out["status"] == "success", out
    assert isinstance(out["id"], int)
    assert [image_size(u) for u in out["output"]] == [(64, 64), (64, 64)]
    assert out["meta"]["seed"] == 11 and out["meta"]["n_samples"] == 2
    assert out["meta"]["guidance_scale"] == 6.5
    fetched = community.fetch(str(out["id"]))
    assert fetched["status"] == "success" and fetched["output"] == out["output"]


def test_legacy_strings_processing_then_fetch(ml: serving.LiveServer) -> None:
    body = {"key": KEY, "model_id": "anything", "prompt": "a boat", "negative_prompt": None,
            "width": "64", "height": "64", "samples": "1", "num_inference_steps": "2",
            "safety_checker": "yes", "enhance_prompt": "yes", "seed": None,
            "guidance_scale": "7.5", "multi_lingual": "no", "panorama": "no",
            "self_attention": "no", "upscale": "no", "embeddings_model": None,
            "lora_model": None, "clip_skip": "2", "tomesd": "yes", "use_karras_sigmas": "yes",
            "vae": None, "lora_strength": None, "scheduler": "UniPCMultistepScheduler",
            "webhook": None, "track_id": None, "instant_response": "yes"}
    r = post(ml, "/api/v3/text2img", body)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["status"] == "processing", first
    assert first["eta"] >= 1 and first["output"] == []
    assert first["fetch_result"] == f"{ml.url}/api/v3/fetch/{first['id']}"
    deadline = time.monotonic() + 90
    while True:
        got = httpx.post(first["fetch_result"], json={"key": KEY}).json()
        if got["status"] != "processing":
            break
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.1)
    assert got["status"] == "success", got
    assert got["meta"]["safety_checker"] == "no" and got["nsfw_content_detected"] is False
    assert image_size(got["output"][0]) == (64, 64)
    # The body forms of fetch (v6 request_id, enterprise) find the same job.
    for path in ("/api/v6/images/fetch", "/api/v1/enterprise/fetch"):
        again = post(ml, path, {"key": KEY, "request_id": first["id"]}).json()
        assert again["status"] == "success" and again["id"] == first["id"]


def test_enterprise_paths(ml: serving.LiveServer) -> None:
    for path in ("/api/v1/enterprise/text2img", "/api/v1/enterprise/images/text2img"):
        out = post(ml, path, {"key": KEY, "prompt": "x", **SMALL}).json()
        assert out["status"] == "success", out


def test_webhook_with_track_id(ml: serving.LiveServer, hooks: Hooks) -> None:
    out = post(ml, "/api/v6/images/text2img", {
        "key": KEY, "prompt": "a lamp", "webhook": hooks.url, "track_id": "t-42",
        "instant_response": True, **SMALL}).json()
    assert out["status"] == "processing", out
    deadline = time.monotonic() + 90
    while not any(p.get("track_id") == "t-42" for p in hooks.posts):
        assert time.monotonic() < deadline, f"no webhook arrived: {hooks.posts}"
        time.sleep(0.05)
    hook = next(p for p in hooks.posts if p.get("track_id") == "t-42")
    assert hook["status"] == "success" and hook["id"] == out["id"]
    assert image_size(hook["output"][0]) == (64, 64)


def test_webhook_ssrf_refused(ml: serving.LiveServer) -> None:
    r = post(ml, "/api/v6/images/text2img", {
        "key": KEY, "prompt": "x", "webhook": "http://169.254.169.254/latest", **SMALL})
    assert r.status_code == 400 and "webhook" in r.json()["message"], r.text


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"samples": "5"}, "samples"),
    ({"samples": 0}, "samples"),
    ({"width": "65"}, "width"),
    ({"width": "wide"}, "width"),
    ({"num_inference_steps": "0"}, "num_inference_steps"),
    ({"num_inference_steps": 100000}, "num_inference_steps"),
    ({"guidance_scale": 25}, "guidance_scale"),
    ({"clip_skip": 9}, "clip_skip"),
    ({"seed": -5}, "seed"),
    ({"safety_checker": "maybe"}, "safety_checker"),
    ({"upscale": "yes"}, "upscale"),
    ({"upscale": "²"}, "upscale"),  # a "digit" str.isdigit() accepts and int() refuses
    ({"panorama": "yes"}, "panorama"),
    ({"highres_fix": True}, "highres_fix"),
    ({"vae": "custom-vae"}, "vae"),
    ({"embeddings_model": "x"}, "embeddings_model"),
    ({"base64": "yes"}, "base64"),
    ({"algorithm_type": "dpmsolver+++"}, "algorithm_type"),
    ({"scheduler": "KarrasVeScheduler"}, "sampler"),
    ({"lora_model": "a,b", "lora_strength": "0.5,0.6,0.7"}, "lora_strength"),
    ({"lora_model": "a", "lora_strength": "2"}, "lora_strength"),
    ({"prompt": "x" * 9000}, "prompt"),
])
def test_bad_input_is_a_400_naming_the_field(ml: serving.LiveServer, body: dict[str, Any],
                                             field: str) -> None:
    r = post(ml, "/api/v6/images/text2img", {"key": KEY, "prompt": "x", **SMALL, **body})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["status"] == "error" and field in err["message"], err
    assert "messege" not in err


def test_auth_legacy_typo_and_unknown_ids(ml: serving.LiveServer) -> None:
    r = post(ml, "/api/v6/images/text2img", {"prompt": "x"})
    assert r.status_code == 401 and r.json() == {
        "status": "error", "message": 'missing API key: send it as "key" in the JSON body'}
    r = post(ml, "/api/v3/text2img", {"key": "wrong", "prompt": "x"})
    assert r.status_code == 401
    assert r.json()["message"] == r.json()["messege"] == "invalid API key"
    r = post(ml, "/api/v6/images/fetch/123", {"key": KEY})
    assert r.status_code == 404 and r.json()["status"] == "error"
    r = post(ml, "/api/v6/images/fetch", {"key": KEY})
    assert r.status_code == 400 and "request_id" in r.json()["message"]
    r = httpx.post(f"{ml.url}/api/v6/images/text2img", content=b"{nope")
    assert r.status_code == 400 and r.json()["status"] == "error"


def test_processing_when_the_job_outlasts_the_wait(tmp_path: Any) -> None:
    runner = fakes.FakeRunner()
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(runner),
                             modelslab_wait_s=0.2) as live:
        runner.hold()
        out = post(live, "/api/v6/images/text2img", {"key": "k", "prompt": "x", **SMALL}).json()
        assert out["status"] == "processing" and out["output"] == []
        assert out["fetch_result"] == f"{live.url}/api/v6/images/fetch/{out['id']}"
        runner.release()
        deadline = time.monotonic() + 60
        while (got := httpx.post(out["fetch_result"], json={"key": "k"}).json())[
                "status"] == "processing":
            assert time.monotonic() < deadline, "the job never finished"
            time.sleep(0.05)
        assert got["status"] == "success" and len(got["output"]) == 1


def test_lora_end_to_end_on_tiny(ml: serving.LiveServer) -> None:
    """tiny-sdxl's LoRA folder holds tiny-lora: it changes the image; unknown names are a 400."""
    base = {"key": KEY, "prompt": "a cat", "seed": 9, **SMALL}
    plain = post(ml, "/api/v6/images/text2img", base).json()
    styled = post(ml, "/api/v6/images/text2img",
                  {**base, "lora_model": "tiny-lora", "lora_strength": "1"}).json()
    assert plain["status"] == styled["status"] == "success", (plain, styled)
    assert styled["meta"]["lora"] == "tiny-lora"
    assert httpx.get(plain["output"][0]).content != httpx.get(styled["output"][0]).content
    r = post(ml, "/api/v6/images/text2img", {**base, "lora_model": "no-such-lora"})
    assert r.status_code == 400, r.text
    assert "no-such-lora" in r.json()["message"] and "tiny-lora" in r.json()["message"]


# -- translation (no server) -----------------------------------------------------------------


def test_normalise_yes_no_and_numeric_strings() -> None:
    body = msgspec.convert(normalise({
        "prompt": "x", "width": "512", "samples": "2", "seed": "", "guidance_scale": "7.5",
        "safety_checker": "yes", "use_karras_sigmas": "no", "upscale": "no",
        "lora_strength": 0.6, "clip_skip": "3", "track_id": 9}), Text2ImgRequest, strict=False)
    assert (body.width, body.samples, body.seed, body.guidance_scale) == (512, 2, None, 7.5)
    assert body.safety_checker is True and body.use_karras_sigmas is False
    assert body.lora_strength == "0.6" and body.clip_skip == 3 and body.track_id == 9


def test_schedulers_map_onto_the_registry() -> None:
    registry = SamplerRegistry.standard()
    assert sampler_for("DPMSolverMultistepScheduler", True, None) == "DPM++ 2M Karras"
    assert sampler_for("DPMSolverMultistepScheduler", False, "none") == (
        "DPMSolverMultistepScheduler")
    assert sampler_for("EulerDiscreteScheduler", True, None) == "EulerDiscreteScheduler"
    assert sampler_for(None, True, None) == "UniPCMultistepScheduler"
    seed_page = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "DPMSolverMultistepScheduler", "HeunDiscreteScheduler",
                 "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler",
                 "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
                 "DEISMultistepScheduler")
    for name in seed_page:
        for karras in (True, False):
            registry.canonical_name(sampler_for(name, karras, None))  # raises if unknown


def test_loras_become_canonical_loras() -> None:
    assert parse_loras("more_details, anime", "0.6,0.8") == (
        Lora(name="more_details", weight=0.6), Lora(name="anime", weight=0.8))
    assert parse_loras("a,b", "0.5") == (Lora(name="a", weight=0.5), Lora(name="b", weight=0.5))
    assert parse_loras("tiny-lora", None) == (Lora(name="tiny-lora", weight=1.0),)
    assert parse_loras(None, None) == ()
    with pytest.raises(ApiError, match="lora_strength needs lora_model"):
        parse_loras(None, "0.5")
    dialect = ModelsLabDialect.__new__(ModelsLabDialect)
    request = dialect.to_canonical(msgspec.convert(normalise({
        "prompt": "x", "lora_model": "tiny-lora", "lora_strength": "0.7", "samples": "2",
        "clip_skip": "3", "scheduler": "LMSDiscreteScheduler"}), Text2ImgRequest, strict=False))
    assert isinstance(request, GenerationRequest)
    assert request.loras == (Lora(name="tiny-lora", weight=0.7),)
    assert (request.n, request.clip_skip, request.sampler) == (2, 1, "LMS Karras")
