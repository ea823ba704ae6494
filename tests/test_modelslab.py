"""ModelsLab text2img, img2img and inpaint: the real ``modelslab-py`` SDK over a socket (its
``Client.base_url`` pointed at the server), legacy string/"yes"-"no" bodies over plain HTTP,
processing + fetch, webhooks with track_id, refusals, init images and masks served by a local
HTTP server (and inline with base64), admission before any image fetch, and the canonical
LoRA/scheduler translation.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from PIL import Image

from gateway.dialects.modelslab import (
    SUBMIT_PATHS,
    Img2ImgRequest,
    ModelsLabDialect,
    Text2ImgRequest,
    image_aliases,
    normalise,
    output_size,
    parse_loras,
    sampler_for,
)
from gateway.errors import ApiError
from inference import GenerationRequest
from inference.request import Lora
from inference.samplers import SamplerRegistry
from tests import fakes, serving
from tests.fakes import WebhookReceiver

KEY = "test-key"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}


def png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def left_half_mask(size: tuple[int, int] = (64, 64)) -> bytes:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 2] = 255
    out = io.BytesIO()
    Image.fromarray(mask, "L").save(out, format="PNG")
    return out.getvalue()


class Images:
    """A local HTTP server for init images and masks: ``files`` maps a path to (type, body);
    any other path is a 404. ``hits`` counts the GETs per path."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {
            "/red.png": ("image/png", png()),
            "/blue.png": ("image/png", png(color=(30, 60, 220))),
            "/tall.png": ("image/png", png((64, 96))),
            "/mask.png": ("image/png", left_half_mask()),
            "/mask-32.png": ("image/png", left_half_mask((32, 32))),
            "/page.html": ("text/html", b"<html>not an image</html>"),
            "/broken.png": ("image/png", b"\x89PNG but not really"),
        }
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                found = outer.files.get(self.path)
                if found is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                ctype, body = found
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = fakes.QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return self.base + path

    def total(self) -> int:
        return sum(self.hits.values())


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    h = WebhookReceiver()
    yield h
    h.close()


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    server = Images()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def ml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    with serving.live_server(tmp_path_factory.mktemp("modelslab"), api_keys=KEY,
                             warmup_sizes="64x64", webhook_allow="127.0.0.1",
                             fetch_allow="127.0.0.1", webhook_retry_delay_s=0.1,
                             modelslab_wait_s=60) as live:
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


def pixels(url: str) -> np.ndarray:
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)


def poll(url: str, deadline_s: float = 90) -> dict[str, Any]:
    """POST ``{key}`` to a fetch URL until the job is no longer processing."""
    deadline = time.monotonic() + deadline_s
    while (got := httpx.post(url, json={"key": KEY}).json())["status"] == "processing":
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.1)
    return got


def wait_for_hook(hooks: Any, track_id: str, timeout: float = 90) -> dict[str, Any]:
    """The webhook post carrying ``track_id``, once it arrives."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in hooks.posts if p.get("track_id") == track_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no webhook for {track_id} arrived: {hooks.posts}"
        time.sleep(0.05)


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


def test_webhook_with_track_id(ml: serving.LiveServer, hooks: WebhookReceiver) -> None:
    out = post(ml, "/api/v6/images/text2img", {
        "key": KEY, "prompt": "a lamp", "webhook": hooks.url, "track_id": "t-42",
        "instant_response": True, **SMALL}).json()
    assert out["status"] == "processing", out
    hook = wait_for_hook(hooks, "t-42")
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
    r = post(ml, "/api/v6/images/fetch", {"key": KEY, "request_id": "9" * 5000})
    assert r.status_code == 404 and len(r.json()["message"]) < 200  # the id is quoted cut short
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


# -- img2img and inpaint ---------------------------------------------------------------------


def test_sdk_img2img_answers_at_the_init_image_size(community: Any, images: Images) -> None:
    from modelslab_py.schemas.community import Image2Image

    # No width/height: the output takes the init image's size (64x96 here, not 512x512).
    # strength is not a field of the SDK's schema; its extra="allow" sends it as given.
    out = community.image_to_image(Image2Image(
        prompt="a red fox", init_image=images.url("/tall.png"), strength=0.5, seed=4,
        num_inference_steps=2))
    assert out["status"] == "success", out
    assert [image_size(u) for u in out["output"]] == [(64, 96)]
    meta = out["meta"]
    assert (meta["W"], meta["H"], meta["strength"], meta["seed"]) == (64, 96, 0.5, 4)
    assert meta["init_image"] == images.url("/tall.png")
    fetched = community.fetch(str(out["id"]))
    assert fetched["status"] == "success" and fetched["output"] == out["output"]
    # The init image reaches the engine: same seed and prompt, another init image, another
    # result (the tiny model's random VAE mutes the difference, but it is deterministic: the
    # two outputs would be identical if init_image were dropped).
    same = {"prompt": "a red fox", "strength": 0.5, "seed": 4, "num_inference_steps": 2}
    red = community.image_to_image(Image2Image(init_image=images.url("/red.png"), **same))
    blue = community.image_to_image(Image2Image(init_image=images.url("/blue.png"), **same))
    assert red["status"] == blue["status"] == "success", (red, blue)
    assert np.abs(pixels(red["output"][0]) - pixels(blue["output"][0])).mean() > 0.5


@pytest.mark.parametrize("enterprise", [False, True])
def test_sdk_inpaint_repaints_only_the_white_area(ml: serving.LiveServer, images: Images,
                                                  enterprise: bool) -> None:
    from modelslab_py.core.apis.community import Community
    from modelslab_py.core.client import Client
    from modelslab_py.schemas.community import Inpainting

    client = Client(KEY, fetch_retry=120, fetch_timeout=1)
    client.base_url = ml.url + "/api/"
    api = Community(client, enterprise=enterprise)  # /api/v1/enterprise/images/inpaint
    out = api.inpainting(Inpainting(
        prompt="a blue sky", init_image=images.url("/red.png"),
        mask_image=images.url("/mask.png"), strength=1.0, seed=3, num_inference_steps=2,
        samples=2))
    assert out["status"] == "success", out
    assert len(out["output"]) == 2 and out["meta"]["mask_image"] == images.url("/mask.png")
    for url in out["output"]:
        got = pixels(url)
        assert got.shape == (64, 64, 3)
        kept = got[:, 40:]  # well inside the black (kept) half
        assert np.abs(kept - np.array([200, 40, 40])).max() <= 3, "kept half changed"
        assert np.abs(got[:, :24] - np.array([200, 40, 40])).max() > 10, "white half unchanged"
    if enterprise:
        assert api.fetch(str(out["id"]))["output"] == out["output"]


IMAGE_PATHS = ["/api/v6/images/img2img", "/api/v3/img2img", "/api/v1/enterprise/img2img",
               "/api/v1/enterprise/images/img2img", "/api/v6/images/inpaint", "/api/v3/inpaint",
               "/api/v1/enterprise/inpaint", "/api/v1/enterprise/images/inpaint"]


def test_the_image_paths_are_the_submit_families() -> None:
    assert sorted(p for p in SUBMIT_PATHS if not p.endswith("/text2img")) == sorted(IMAGE_PATHS)


@pytest.mark.parametrize("path", IMAGE_PATHS)
def test_every_image_path_is_served(ml: serving.LiveServer, images: Images, path: str) -> None:
    body = {"key": KEY, "prompt": "x", "init_image": images.url("/red.png"), **SMALL}
    if path.endswith("/inpaint"):
        body["mask_image"] = images.url("/mask.png")
    out = post(ml, path, body).json()
    assert out["status"] == "success", (path, out)
    assert image_size(out["output"][0]) == (64, 64)
    assert out["meta"]["strength"] == 0.7  # the vendor examples' value when left out


def test_legacy_img2img_strings_aliases_processing_then_fetch(ml: serving.LiveServer,
                                                              images: Images) -> None:
    # The legacy pages' names: prompt_strength (for strength) and steps; everything a string.
    body = {"key": KEY, "prompt": "a boat", "negative_prompt": None,
            "init_image": images.url("/red.png"), "width": "64", "height": "64",
            "samples": "1", "steps": "4", "prompt_strength": "0.5", "seed": "8",
            "safety_checker": "no", "enhance_prompt": "yes", "guidance_scale": "7.5",
            "base64": "no", "webhook": None, "track_id": None, "instant_response": "yes"}
    first = post(ml, "/api/v3/img2img", body).json()
    assert first["status"] == "processing", first
    assert first["fetch_result"] == f"{ml.url}/api/v3/fetch/{first['id']}"
    got = poll(first["fetch_result"])
    assert got["status"] == "success", got
    assert (got["meta"]["strength"], got["meta"]["steps"], got["meta"]["seed"]) == (0.5, 4, 8)
    assert image_size(got["output"][0]) == (64, 64)


def test_inline_images_with_base64(ml: serving.LiveServer, images: Images) -> None:
    hits = images.total()
    data_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    raw_mask = base64.b64encode(left_half_mask()).decode()
    out = post(ml, "/api/v6/images/inpaint", {
        "key": KEY, "prompt": "x", "init_image": data_uri, "mask_image": raw_mask,
        "base64": True, "strength": 1, "seed": 2, **SMALL}).json()
    assert out["status"] == "success", out
    # Output stays URLs; inline inputs are not echoed back in meta.
    assert out["output"][0].startswith("http") and out["meta"]["init_image"] is None
    got = pixels(out["output"][0])
    assert np.abs(got[:, 40:] - np.array([200, 40, 40])).max() <= 3
    assert images.total() == hits, "nothing was fetched"


def test_image_webhook_with_track_id(ml: serving.LiveServer, hooks: WebhookReceiver,
                                     images: Images) -> None:
    out = post(ml, "/api/v6/images/img2img", {
        "key": KEY, "prompt": "a lamp", "init_image": images.url("/red.png"),
        "webhook": hooks.url, "track_id": "i2i-7", "instant_response": True, **SMALL}).json()
    assert out["status"] == "processing", out
    hook = wait_for_hook(hooks, "i2i-7")
    assert hook["status"] == "success" and hook["id"] == out["id"]
    assert hook["meta"]["init_image"] == images.url("/red.png")


BAD_IMAGE_INPUT = [
    # (path, body changes, field named, words in the message)
    ("img2img", {"init_image": None}, "init_image", "required"),
    ("img2img", {"init_image": "  "}, "init_image", "required"),
    ("img2img", {"init_image": 42}, "init_image", "init_image"),
    ("img2img", {"init_image": "/red.png"}, "init_image", "base64 to true"),
    ("img2img", {"init_image": base64.b64encode(png()).decode()}, "init_image", "base64 to true"),
    ("img2img", {"init_image": "data:image/png;base64,!!!!", "base64": True}, "init_image",
     "not a readable image"),
    ("img2img", {"init_image": "bm90IGFuIGltYWdl", "base64": "yes"}, "init_image",
     "not a readable image"),
    ("img2img", {"init_image": "URL:/missing.png"}, "init_image", "HTTP 404"),
    ("img2img", {"init_image": "URL:/page.html"}, "init_image", "did not return an image"),
    ("img2img", {"init_image": "URL:/broken.png"}, "init_image", "not a readable image"),
    ("img2img", {"init_image": "http://169.254.169.254/latest/x.png"}, "init_image",
     "link-local"),
    ("img2img", {"init_image": "ftp://example.com/x.png"}, "init_image", "base64 to true"),
    ("img2img", {"strength": 0}, "strength", "strength"),
    ("img2img", {"strength": 1.5}, "strength", "strength"),
    ("img2img", {"strength": "-0.2"}, "strength", "strength"),
    ("img2img", {"strength": "strong"}, "strength", "strength"),
    ("img2img", {"strength": 0.1}, "strength", "no denoising step"),  # 2 steps × 0.1
    ("img2img", {"width": "60"}, "width", "multiple of 8"),
    ("img2img", {"scheduler": "KarrasVeScheduler"}, "sampler", "KarrasVeScheduler"),
    ("img2img", {"prompt": ""}, "prompt", "required"),
    ("img2img", {"samples": 9}, "samples", "samples"),
    ("img2img", {"upscale": "yes"}, "upscale", "not supported"),
    ("inpaint", {"mask_image": None}, "mask_image", "required"),
    ("inpaint", {"mask_image": "URL:/mask-32.png"}, "mask_image", "32x32 but init_image is 64x64"),
    ("inpaint", {"mask_image": "URL:/missing.png"}, "mask_image", "HTTP 404"),
    ("inpaint", {"mask_image": "URL:/broken.png"}, "mask_image", "not a readable image"),
    ("inpaint", {"mask_image": "not-base64", "base64": True}, "mask_image", "base64"),
]


@pytest.mark.parametrize(("op", "change", "field", "words"), BAD_IMAGE_INPUT)
def test_bad_image_input_is_a_400_in_the_envelope(ml: serving.LiveServer, images: Images,
                                                  op: str, change: dict[str, Any], field: str,
                                                  words: str) -> None:
    body: dict[str, Any] = {"key": KEY, "prompt": "x", "init_image": images.url("/red.png"),
                            **SMALL}
    if op == "inpaint":
        body["mask_image"] = images.url("/mask.png")
    for name, value in change.items():
        if isinstance(value, str) and value.startswith("URL:"):
            value = images.url(value[4:])
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    for path in (f"/api/v6/images/{op}", f"/api/v3/{op}"):
        r = post(ml, path, body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()
        assert err["status"] == "error" and set(err) <= {"status", "message", "messege"}, err
        assert field in err["message"] and words in err["message"], err
        assert ("messege" in err) == path.startswith("/api/v3/"), err


def test_image_routes_check_the_key_first(ml: serving.LiveServer, images: Images) -> None:
    hits = images.total()
    body = {"prompt": "x", "init_image": images.url("/red.png"), **SMALL}
    r = post(ml, "/api/v6/images/img2img", body)
    assert r.status_code == 401 and r.json()["status"] == "error", r.text
    r = post(ml, "/api/v1/enterprise/inpaint", {**body, "key": "wrong",
                                                 "mask_image": images.url("/mask.png")})
    assert r.status_code == 401 and r.json()["message"] == "invalid API key", r.text
    r = httpx.post(f"{ml.url}/api/v6/images/inpaint", content=b"[1, 2")
    assert r.status_code == 400 and r.json()["status"] == "error", r.text
    assert images.total() == hits, "an unauthenticated request fetched an image"


def test_quota_is_checked_before_any_image_is_fetched(tmp_path: Any, images: Images,
                                                      capsys: pytest.CaptureFixture) -> None:
    from gateway.cli import main as cli

    keys_file = tmp_path / "keys.json"
    assert cli(["keys", "create", "--keys-file", str(keys_file), "--id", "d", "--daily", "2"]) == 0
    key = dict(re.findall(r"^(\w+):\s+(\S+)$", capsys.readouterr().out, re.M))["api_key"]
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(fakes.FakeRunner()),
                             keys_file=str(keys_file), fetch_allow="127.0.0.1") as live:
        body = {"key": key, "prompt": "x", "init_image": images.url("/red.png"),
                "mask_image": images.url("/mask.png"), **SMALL}
        # A request refused before admission fetches nothing and spends no quota.
        start = images.total()
        r = httpx.post(f"{live.url}/api/v6/images/inpaint",
                       json={**body, "scheduler": "NoSuchScheduler"}, timeout=60)
        assert r.status_code == 400 and "NoSuchScheduler" in r.json()["message"], r.text
        assert images.total() == start
        # Within the quota each call fetches its images (the counter works).
        for path in ("/api/v6/images/inpaint", "/api/v3/img2img"):
            r = httpx.post(f"{live.url}{path}", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["status"] == "success", r.text
        assert images.total() == start + 3  # init + mask, then init
        # The daily quota is spent: refused in the envelope before anything is fetched.
        for path in ("/api/v6/images/inpaint", "/api/v1/enterprise/img2img"):
            r = httpx.post(f"{live.url}{path}", json=body, timeout=60)
            assert r.status_code == 429, r.text
            assert r.json()["status"] == "error" and r.json()["message"], r.text
        assert images.total() == start + 3


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


def test_image_aliases_and_output_size() -> None:
    assert image_aliases({"prompt_strength": "0.4", "steps": "21"}) == {
        "prompt_strength": "0.4", "steps": "21", "strength": "0.4", "num_inference_steps": "21"}
    # The current names win over the old ones.
    assert image_aliases({"strength": 0.6, "prompt_strength": 0.2})["strength"] == 0.6
    # An empty or "null" current name is absent, as normalise reads it: the old name counts.
    assert image_aliases({"strength": "", "prompt_strength": 0.2, "num_inference_steps": "null",
                          "steps": 4}) == {
        "strength": 0.2, "prompt_strength": 0.2, "num_inference_steps": 4, "steps": 4}
    body = msgspec.convert(normalise(image_aliases({
        "prompt": "x", "init_image": "http://h/i.png", "strength": "", "steps": "5"})),
        Img2ImgRequest, strict=False)
    assert (body.strength, body.num_inference_steps, body.width, body.height) == (0.7, 5, None,
                                                                                  None)
    bounds = {"area": 1024 * 1024, "min_size": 64, "max_size": 2048}
    assert output_size(None, None, (640, 480), **bounds) == (640, 480)
    assert output_size(None, None, (641, 483), **bounds) == (640, 480)  # multiples of 8
    assert output_size(None, None, (4000, 3000), **bounds) == (1176, 880)  # ~1 MP, aspect kept
    assert output_size(512, None, (640, 480), **bounds) == (512, 384)  # the other side follows
    assert output_size(None, 240, (640, 480), **bounds) == (320, 240)
    assert output_size(768, 512, (640, 480), **bounds) == (768, 512)  # as asked
