"""AUTOMATIC1111 ``/sdapi/v1`` dialect over a real socket.

There is no official A1111 client and the popular ``webuiapi`` package is not in this project's
package index, so these tests speak plain HTTP (httpx) the way those clients do.
"""

from __future__ import annotations

import base64
import io
import json
import types

import httpx
import msgspec
import numpy as np
import pytest
from PIL import Image

from gateway.dialects.a1111 import A1111Dialect, Img2ImgRequest
from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

FAST = {"width": 64, "height": 64, "steps": 2}


def png_b64(color: tuple[int, int, int] | int = (200, 30, 30), size=(64, 64),
            mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def sd(live, path: str, body: object | None = None, **kw) -> httpx.Response:
    url = f"{live.url}/sdapi/v1/{path}"
    if body is None:
        return httpx.get(url, timeout=120, **kw)
    return httpx.post(url, json=body, timeout=120, **kw)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_batch_info_and_parameters(server):
    body = {"prompt": "a lighthouse", "negative_prompt": "blurry", **FAST, "batch_size": 2,
            "seed": 42, "sampler_name": "Euler a", "cfg_scale": 6, "alwayson_scripts": {},
            "some_extension_field": {"ignored": True}, "save_images": False}
    resp = sd(server, "txt2img", body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert set(data) == {"images", "parameters", "info"}
    assert len(data["images"]) == 2
    assert all(decode(b).size == (64, 64) and decode(b).format == "PNG" for b in data["images"])
    info = json.loads(data["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2 and info["cfg_scale"] == 6
    assert info["all_prompts"] == ["a lighthouse"] * 2
    assert info["infotexts"][1].endswith("Seed: 43, Size: 64x64, Model: " + info["sd_model_name"])
    assert data["parameters"]["prompt"] == "a lighthouse"
    assert data["parameters"]["n_iter"] == 1
    assert "some_extension_field" not in data["parameters"]


def test_nulls_and_numbers_in_strings_are_read_as_a1111_reads_them(server):
    # A1111's API models are pydantic 1 with every field optional: null is the default, "2" is 2
    # (clients generated from its OpenAPI document send null for unset fields).
    body = {"prompt": "x", "width": "64", "height": 64.0, "steps": "2", "cfg_scale": "6.5",
            "seed": None, "subseed": None, "styles": None, "override_settings": None,
            "script_args": None, "alwayson_scripts": None, "negative_prompt": None,
            "send_images": None, "batch_size": "1"}
    resp = sd(server, "txt2img", body)
    assert resp.status_code == 200, resp.text
    info = json.loads(resp.json()["info"])
    assert (info["width"], info["steps"], info["cfg_scale"]) == (64, 2, 6.5)
    assert 0 <= info["seed"] <= 2**32 - 1 and info["negative_prompt"] == ""
    assert len(resp.json()["images"]) == 1
    assert validation_loc(sd(server, "txt2img", {"prompt": "x", "steps": "two"})) == [
        "body", "steps"]
    # Booleans as pydantic spells them: "no" keeps the images out of the answer.
    quiet = sd(server, "txt2img", {"prompt": "x", **FAST, "send_images": "No",
                                   "enable_hr": "off", "tiling": "n"})
    assert quiet.status_code == 200 and quiet.json()["images"] == [], quiet.text
    assert validation_loc(sd(server, "txt2img", {"prompt": "x", "send_images": "maybe"})) == [
        "body", "send_images"]


def test_every_reported_seed_can_be_sent_back(server):
    # Image i of seed s uses s + i, wrapped to 32 bits: the last seed's next is 0.
    resp = sd(server, "txt2img", {"prompt": "x", **FAST, "batch_size": 2, "seed": 2**32 - 1})
    assert resp.status_code == 200, resp.text
    info = json.loads(resp.json()["info"])
    assert info["all_seeds"] == [2**32 - 1, 0]
    again = sd(server, "txt2img", {"prompt": "x", **FAST, "seed": info["all_seeds"][1]})
    assert again.status_code == 200, again.text
    # The same image, but for batched arithmetic's last bits; another seed's is far off.
    second, replay, first = (np.asarray(decode(b), dtype=int) for b in (
        resp.json()["images"][1], again.json()["images"][0], resp.json()["images"][0]))
    assert np.abs(second - replay).mean() < 1
    assert np.abs(second - first).mean() > 10


def test_scheduler_format_and_clip_skip_settings(server):
    body = {"prompt": "x", **FAST, "sampler_name": "DPM++ 2M", "scheduler": "karras",
            "n_iter": 2, "override_settings": {"samples_format": "jpg",
                                               "CLIP_stop_at_last_layers": 2}}
    resp = sd(server, "txt2img", body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert len(data["images"]) == 2 and decode(data["images"][0]).format == "JPEG"
    info = json.loads(data["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["clip_skip"] == 2
    assert "Clip skip: 2" in info["infotexts"][0]
    # SDXL already reads the penultimate layer (A1111's 2); 3 skips one layer more, the same
    # meaning every dialect that takes A1111's clip_skip gives it.
    body["override_settings"] = {"CLIP_stop_at_last_layers": 3}
    info = json.loads(sd(server, "txt2img", body).json()["info"])
    assert info["clip_skip"] == 3 and "Clip skip: 3" in info["infotexts"][0]


def test_img2img_from_base64_and_data_uri(server):
    for image in (png_b64(), "data:image/png;base64," + png_b64((10, 200, 10))):
        body = {"prompt": "repaint", "init_images": [image], "denoising_strength": 0.5,
                **FAST, "seed": 3}
        resp = sd(server, "img2img", body)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert len(data["images"]) == 1 and decode(data["images"][0]).size == (64, 64)
        assert data["parameters"]["init_images"] is None  # not echoed, as A1111
        assert json.loads(data["info"])["denoising_strength"] == 0.5


def validation_loc(resp: httpx.Response) -> list:
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail[0]["msg"]
    return detail[0]["loc"]


@pytest.mark.parametrize(("path", "body", "loc"), [
    ("txt2img", {"prompt": "x", "batch_size": 8, "n_iter": 3}, ["body", "batch_size"]),
    ("txt2img", {"prompt": "x", "steps": 100_000}, ["body", "steps"]),
    ("txt2img", {"prompt": "x", "width": 100, "height": 64}, ["body", "width"]),
    ("txt2img", {"prompt": "x", "width": 64, "height": 100_000}, ["body", "height"]),
    ("txt2img", {"prompt": "x", "seed": 2**40}, ["body", "seed"]),
    ("txt2img", {"prompt": "x", "cfg_scale": "lots"}, ["body", "cfg_scale"]),
    ("txt2img", {"prompt": "x" * 40_000}, ["body", "prompt"]),
    ("txt2img", {"prompt": ""}, ["body", "prompt"]),
    ("txt2img", {"prompt": "x", "enable_hr": True}, ["body", "enable_hr"]),
    ("txt2img", {"prompt": "x", "scheduler": "exponential"}, ["body", "scheduler"]),
    ("txt2img", {"prompt": "x", "sampler_name": "Euler", "scheduler": "karras"},
     ["body", "scheduler"]),
    ("txt2img", {"prompt": "x", "script_name": "x/y/z plot"}, ["body", "script_name"]),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"controlnet": {"args": []}}},
     ["body", "alwayson_scripts"]),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other.ckpt"}},
     ["body", "override_settings", "sd_model_checkpoint"]),
    ("txt2img", {"prompt": "x", "override_settings": {"samples_format": "tiff"}},
     ["body", "override_settings", "samples_format"]),
    ("img2img", {"prompt": "x", "init_images": ["not base64 at all!"]},
     ["body", "init_images", 0]),
    ("img2img", {"prompt": "x", "init_images": ["data:foo"]}, ["body", "init_images", 0]),
    ("img2img", {"prompt": "x", "init_images": [png_b64()], "denoising_strength": 1.5},
     ["body", "denoising_strength"]),
    ("img2img", {"prompt": "x", "init_images": [png_b64()], "mask": "bm90IGFuIGltYWdl"},
     ["body", "mask"]),
])
def test_field_errors_are_fastapi_422(server, path, body, loc):
    assert validation_loc(sd(server, path, body)) == loc


def test_invalid_json_is_422_json_invalid(server):
    resp = httpx.post(server.url + "/sdapi/v1/txt2img", content=b"{nope",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "json_invalid"


def test_other_errors_use_the_middleware_shape(server):
    resp = sd(server, "txt2img", {"prompt": "x", "sampler_name": "Nonexistent"})
    assert resp.status_code == 404
    body = resp.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["error"] == "HTTPException" and body["detail"].startswith("Sampler not found")
    missing = sd(server, "img2img", {"prompt": "x"})
    assert missing.status_code == 404 and missing.json()["detail"] == "Init image not found"
    unknown = sd(server, "no-such-route")
    assert unknown.status_code == 404 and set(unknown.json()) == {"error", "detail", "body",
                                                                  "errors"}
    method = httpx.get(server.url + "/sdapi/v1/txt2img")
    assert method.status_code == 405 and method.json()["error"] == "HTTPException"


def test_samplers_models_and_options(server):
    samplers = sd(server, "samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert "k_euler_a" in next(s for s in samplers if s["name"] == "Euler a")["aliases"]
    # Every listed name and alias is accepted by the engine's registry.
    registry = server.engine.samplers
    for s in samplers:
        registry.canonical_name(s["name"])
    models = sd(server, "sd-models").json()
    assert len(models) == 1 and models[0]["title"] == server.engine.info.id
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    options = sd(server, "options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    same = sd(server, "options", {"sd_model_checkpoint": models[0]["title"], "sd_vae": "x"})
    assert same.status_code == 200 and same.json() is None
    other = sd(server, "options", {"sd_model_checkpoint": "sd_xl_turbo.safetensors"})
    assert validation_loc(other) == ["body", "sd_model_checkpoint"]
    assert "serves only" in other.json()["detail"][0]["msg"]


def test_k_diffusion_alias_is_accepted(server):
    resp = sd(server, "txt2img", {"prompt": "x", **FAST, "sampler_index": "k_euler_a"})
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["info"])["sampler_name"] == "Euler a"


def test_progress_shape(server):
    resp = sd(server, "progress")
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"job_count", "sampling_step", "sampling_steps"} <= set(body["state"])


def test_auth_bearer_and_basic(keyed_server):
    none = sd(keyed_server, "samplers")
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Basic"
    assert set(none.json()) == {"error", "detail", "body", "errors"}
    bearer = sd(keyed_server, "samplers", headers={"authorization": "Bearer test-key"})
    assert bearer.status_code == 200
    basic = sd(keyed_server, "samplers", auth=("anyone", "test-key"))
    assert basic.status_code == 200
    wrong = sd(keyed_server, "sd-models", auth=("anyone", "wrong"))
    assert wrong.status_code == 401
    garbled = sd(keyed_server, "sd-models", headers={"authorization": "Basic \u00e9t\u00e9".encode("latin-1")})
    assert garbled.status_code == 401  # not a 500: non-ASCII Basic credentials
    for header in ("Basic bm9jb2xvbg==", "Basic ###"):  # no colon; not base64
        bad = sd(keyed_server, "sd-models", headers={"authorization": header})
        assert bad.status_code == 401
        assert bad.json()["detail"].startswith("Incorrect username or password"), bad.text
    gen = sd(keyed_server, "txt2img", {"prompt": "x", **FAST}, auth=("u", "test-key"))
    assert gen.status_code == 200 and len(gen.json()["images"]) == 1
    weak = sd(keyed_server, "img2img", {"prompt": "x", "init_images": [png_b64()], "steps": 3,
                                        "denoising_strength": 0.3, "width": 64, "height": 64},
              auth=("u", "test-key"))
    assert weak.status_code == 422
    assert weak.json()["detail"][0]["loc"] == ["body", "denoising_strength"], weak.text
    lab = io.BytesIO()
    Image.new("LAB", (64, 64)).save(lab, format="TIFF")
    for invert in (0, 1):
        masked = sd(keyed_server, "img2img", {
            "prompt": "x", "init_images": [png_b64()], "inpainting_mask_invert": invert,
            "mask": base64.b64encode(lab.getvalue()).decode(), **FAST}, auth=("u", "test-key"))
        assert masked.status_code == 200, masked.text


@pytest.fixture(scope="module")
def fake_live(tmp_path_factory):
    runner = FakeRunner()
    with live_server(tmp_path_factory.mktemp("a1111"), engine_factory=engine_factory(runner)) as live:
        yield live


def test_progress_follows_the_engine_snapshot(fake_live):
    preview = base64.b64decode(png_b64())
    snap = types.SimpleNamespace(active=True, step=3, total_steps=12, fraction=0.25,
                                 eta_seconds=4.5, queued_requests=2, preview=preview)
    fake_live.engine.progress = lambda: snap  # the contract Engine.progress() fills
    try:
        body = sd(fake_live, "progress").json()
        assert body["progress"] == 0.25 and body["eta_relative"] == 4.5
        assert body["state"]["sampling_step"] == 3 and body["state"]["sampling_steps"] == 12
        assert body["state"]["job_count"] == 3
        assert base64.b64decode(body["current_image"]) == preview
        skipped = sd(fake_live, "progress", params={"skip_current_image": "true"}).json()
        assert skipped["current_image"] is None
        snap.active, snap.preview = False, None
        idle = sd(fake_live, "progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 2
    finally:
        del fake_live.engine.progress


def test_img2img_mask_reaches_the_request_inverted_on_request(fake_live):
    dialect = A1111Dialect(fake_live.app.state.ctx)
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    out = io.BytesIO()
    white_left.save(out, format="PNG")
    mask = base64.b64encode(out.getvalue()).decode()
    import asyncio

    async def build(invert: int):
        body = msgspec.convert({"prompt": "x", "init_images": [png_b64()], "mask": mask,
                                "inpainting_mask_invert": invert, "denoising_strength": 0.6},
                               Img2ImgRequest)
        return await dialect.init_image(body)

    plain = asyncio.run(build(0))
    assert plain.strength == 0.6 and plain.mask == out.getvalue()
    inverted = asyncio.run(build(1))
    pixels = Image.open(io.BytesIO(inverted.mask))
    assert pixels.getpixel((0, 0)) == 0 and pixels.getpixel((63, 0)) == 255
    resp = sd(fake_live, "img2img", {"prompt": "x", "init_images": [png_b64()], "mask": mask,
                                     **FAST})
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["info"])["is_using_inpainting_conditioning"] is True


def test_interrupt_and_skip_cut_the_callers_running_generation_short(tmp_path):
    """``/interrupt`` ends the caller's running txt2img early: it answers 200 with the image
    decoded at that step. Another key's interrupt does not touch it."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_inference_features import StepRecorder

    a = {"authorization": "Bearer key-a"}
    b = {"authorization": "Bearer key-b"}

    def state(**kw) -> dict:
        resp = sd(live, "progress", **kw)
        assert resp.status_code == 200, resp.text
        return resp.json()["state"]

    with live_server(tmp_path, api_keys="key-a,key-b") as live:
        runner = live.engine._runner
        recorder = StepRecorder(runner.observer, at_step=2)
        runner.observer = recorder
        try:
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(sd, live, "txt2img", {
                    "prompt": "x", "steps": 30, "width": 64, "height": 64}, headers=a)
                assert recorder.reached.wait(120), "the generation never reached step 2"
                tickets = [t for tagged in live.engine._tagged.values() for t in tagged]
                assert len(tickets) == 1
                assert not state(headers=a)["interrupted"]
                other = sd(live, "interrupt", {}, headers=b)
                assert (other.status_code, other.json()) == (200, {})
                assert not tickets[0].stop_early, "another key's interrupt stopped it"
                assert sd(live, "interrupt", {}).status_code == 401
                mine = sd(live, "interrupt", {}, headers=a)
                assert (mine.status_code, mine.json()) == (200, {})
                assert state(headers=a)["interrupted"]
                skip = sd(live, "skip", {}, headers=a)
                assert (skip.status_code, skip.json()) == (200, None)
                assert state(headers=a)["skipped"]
                assert tickets[0].stop_early
                recorder.released.set()
                done = running.result(120)
        finally:
            recorder.released.set()
            runner.observer = recorder.inner
        after = state(headers=a)
        assert after["skipped"], "the flag lasts until the key's next generation, as in A1111"
        assert sd(live, "txt2img", {"prompt": "y", **FAST}, headers=a).status_code == 200
        after = state(headers=a)
        assert not after["skipped"] and not after["interrupted"], after
    assert done.status_code == 200, done.text
    assert len(done.json()["images"]) == 1
    (steps,) = recorder.steps.values()
    assert max(steps) < 30, f"ran every step: {steps}"
