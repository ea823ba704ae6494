"""Alibaba Cloud SCC dialect over plain HTTP: submit, poll, image URLs, ControlNet units,
every refusal in the code/message envelope, and tasks that survive a restart.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from PIL import Image

from gateway.jobs import job_store
from inference import GenerationRequest
from inference.request import ControlUnit
from inference.tasks import QUEUED, RUNNING, Job
from tests import fakes, serving

KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "steps": 2}


def png_b64(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def scc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    with serving.live_server(tmp_path_factory.mktemp("scc"), api_keys=KEY,
                             warmup_sizes="64x64") as live:
        yield live


def submit(live: serving.LiveServer, body: dict[str, Any], path: str = "sd_txt2img",
           headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{live.url}/scc/{path}", json=body, headers={**AUTH, **(headers or {})},
                      timeout=60)


def wait_result(live: serving.LiveServer, task_id: str, auth: dict[str, str] = AUTH,
                timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{live.url}/scc/sd_get_result", json={"taskId": task_id}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["data"]["status"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, f"task {task_id} still {body['data']['status']}"
        time.sleep(0.1)


def test_txt2img_task_to_image_urls(scc: serving.LiveServer) -> None:
    r = submit(scc, {"prompt": "a red fox", "negtive_prompt": "blurry", "batch_size": 2,
                     "seed": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras", **SMALL},
               headers={"X-SP-RESOURCE-CONFIG-ID": "pool-1"})
    assert r.status_code == 200, r.text
    sub = r.json()
    assert sub["code"] == "Success" and sub["success"] is True and sub["requestId"]
    assert sub["data"]["status"] in ("waiting", "running")
    body = wait_result(scc, sub["data"]["taskId"])
    data = body["data"]
    assert data["status"] == "succeeded", data
    assert data["taskId"] == sub["data"]["taskId"]
    assert data["info"]["all_seeds"] == [5, 6]
    assert data["info"]["negative_prompt"] == "blurry"
    assert data["info"]["sampler_name"] == "DPM++ 2M Karras"
    assert data["parameters"]["negtive_prompt"] == "blurry"
    assert len(data["images"]) == 2
    for url in data["images"]:
        img = httpx.get(url)
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(img.content)).size == (64, 64)


def test_img2img_from_base64(scc: serving.LiveServer) -> None:
    r = submit(scc, {"prompt": "a boat", "init_images": [png_b64()], "denoising_strength": 0.5,
                     "stable_diffusion_model": "tiny-sdxl", "sd_vae": "Automatic", **SMALL},
               path="sd_img2img")
    assert r.status_code == 200, r.text
    data = wait_result(scc, r.json()["data"]["taskId"])["data"]
    assert data["status"] == "succeeded" and len(data["images"]) == 1
    assert "init_images" not in data["parameters"]


def test_controlnet_units_become_canonical_units(scc: serving.LiveServer) -> None:
    """Both spellings (vendor ``units``, A1111 ``args``); disabled units are dropped."""
    image = png_b64((255, 255, 255))
    units = [
        {"module": "canny", "model": "diffusers_xl_canny_mid", "input_image": image,
         "weight": 0.8, "guidance_start": 0.1, "guidance_end": 0.9},
        {"module": "none", "model": "controlnet-canny-sdxl-1.0", "image": image},
        {"module": "canny", "input_image": image, "enabled": False},
    ]
    for key in ("units", "args"):
        r = submit(scc, {"prompt": "edges", **SMALL,
                         "alwayson_scripts": {"controlnet": {key: units}}})
        assert r.status_code == 200, r.text
        job = scc.app.state.ctx.jobs.store.get(r.json()["data"]["taskId"])
        request = msgspec.json.decode(job.payload["request"], type=GenerationRequest)
        raw = base64.b64decode(image)
        assert request.control == (
            ControlUnit(kind="canny", image=raw, weight=0.8, guidance_start=0.1,
                        guidance_end=0.9, preprocess=True),
            ControlUnit(kind="canny", image=raw, preprocess=False),
        )
        wait_result(scc, job.id)  # let it finish before the next test


@pytest.mark.parametrize(("body", "field"), [
    ({"restore_faces": True}, "restore_faces"),
    ({"enable_hr": True}, "enable_hr"),
    ({"steps": 0}, "steps"),
    ({"steps": 100000}, "steps"),
    ({"width": 65}, "width"),
    ({"width": 0}, "width"),  # not the model's default: only a missing size is
    ({"height": 0}, "height"),
    ({"width": -64}, "width"),
    ({"sampler_name": "Nope"}, "sampler"),
    ({"scheduler": "exponential"}, "scheduler"),
    ({"stable_diffusion_model": "sd_xl_base_1.0.safetensors"}, "stable_diffusion_model"),
    ({"sd_vae": "None"}, "sd_vae"),
    ({"batch_size": 9}, "batch_size"),
    ({"batch_size": 8, "n_iter": 8}, "batch_size"),  # 64 images: the product is bounded too
    ({"n_iter": 0}, "n_iter"),
    ({"cfg_scale": 31}, "cfg_scale"),
    ({"seed": -2}, "seed"),
    ({"clip_skip": 13}, "clip_skip"),
    ({"prompt": "x" * 9000}, "prompt"),
    ({"alwayson_scripts": {"roop": {"args": []}}}, "alwayson_scripts.roop"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "canny"}]}}},
     "alwayson_scripts.controlnet.args[0].input_image"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "input_image": "%%%"}]}}},
     "alwayson_scripts.controlnet.args[0].input_image"),
    ({"alwayson_scripts": {"controlnet": {"units": [
        {"module": "canny", "input_image": "aGk=", "weight": 3}]}}},
     "alwayson_scripts.controlnet.units[0].weight"),
    ({"alwayson_scripts": {"controlnet": {"units": [
        {"module": "none", "model": "mystery", "input_image": "aGk="}]}}},
     "alwayson_scripts.controlnet.units[0].model"),
    ({"alwayson_scripts": {"controlnet": {"units": [
        {"module": "canny", "model": "xl_depth", "input_image": "aGk="}]}}},
     "alwayson_scripts.controlnet.units[0].model"),
])
def test_bad_input_is_a_400_naming_the_field(scc: serving.LiveServer, body: dict[str, Any],
                                             field: str) -> None:
    r = submit(scc, {"prompt": "x", **SMALL, **body})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == "InvalidParameter" and err["success"] is False and err["requestId"]
    assert field in err["message"], err


def test_img2img_needs_one_init_image(scc: serving.LiveServer) -> None:
    for images in ([], [png_b64(), png_b64()]):
        r = submit(scc, {"prompt": "x", "init_images": images}, path="sd_img2img")
        assert r.status_code == 400 and "init_images" in r.json()["message"], r.text


def test_auth_unknown_task_and_bad_json(scc: serving.LiveServer) -> None:
    r = httpx.post(f"{scc.url}/scc/sd_txt2img", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    r = httpx.post(f"{scc.url}/scc/sd_txt2img", json={"prompt": "x"},
                   headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    r = httpx.post(f"{scc.url}/scc/sd_get_result", json={"taskId": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["code"] == "NotFound"
    r = httpx.post(f"{scc.url}/scc/sd_get_result", content=b"{nope", headers=AUTH)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    r = httpx.post(f"{scc.url}/scc/sd_get_result", json={}, headers=AUTH)
    assert r.status_code == 400 and "taskId" in r.json()["message"]
    r = httpx.get(f"{scc.url}/scc/sd_txt2img", headers=AUTH)
    assert r.status_code == 405 and r.json()["code"] == "MethodNotAllowed"


def test_tasks_are_private_to_their_key(tmp_path: Any) -> None:
    runner = fakes.FakeRunner()
    with serving.live_server(tmp_path, api_keys="key-a,key-b",
                             engine_factory=fakes.engine_factory(runner)) as live:
        a = {"authorization": "Bearer key-a"}
        r = httpx.post(f"{live.url}/scc/sd_txt2img", json={"prompt": "x", **SMALL}, headers=a)
        task = r.json()["data"]["taskId"]
        assert wait_result(live, task, a)["data"]["status"] == "succeeded"
        r = httpx.post(f"{live.url}/scc/sd_get_result", json={"taskId": task},
                       headers={"authorization": "Bearer key-b"})
        assert r.status_code == 404


def test_tasks_survive_a_restart(tmp_path: Any) -> None:
    """Nothing accepted is lost: a finished task is still served after a restart, a queued one
    runs, and one cut off while running runs again."""
    factory = fakes.engine_factory(fakes.FakeRunner())
    with serving.live_server(tmp_path, engine_factory=factory) as live:
        task = httpx.post(f"{live.url}/scc/sd_txt2img", json={"prompt": "x", **SMALL}
                          ).json()["data"]["taskId"]
        done = wait_result(live, task)["data"]
        assert done["status"] == "succeeded"
    # Tasks the first server left queued and running (written as a crash would leave them).
    store = job_store(tmp_path / "data")
    store.open()
    now = time.time()
    request = msgspec.json.encode(GenerationRequest(prompt="x", width=64, height=64)).decode()
    for name, status in (("left-queued", QUEUED), ("cut-off", RUNNING)):
        store.create(Job(id=name, dialect="alibaba", scope="anonymous", status=status,
                         payload={"request": request, "parameters": {}}, created_at=now,
                         expires_at=now + 3600, worker_id="dead-server"))
    store.close()
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(fakes.FakeRunner())
                             ) as live:
        again = wait_result(live, task)["data"]
        assert again["status"] == "succeeded"
        assert again["info"]["all_seeds"] == done["info"]["all_seeds"]
        assert httpx.get(again["images"][0]).status_code == 200
        for name in ("left-queued", "cut-off"):
            body = wait_result(live, name)["data"]
            assert body["status"] == "succeeded", (name, body)
            assert len(body["images"]) == 1


def square_b64() -> str:
    """A grey square on black: clear edges for the canny preprocessor."""
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((180, 180, 180), (16, 16, 48, 48))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_controlnet_end_to_end_on_tiny(scc: serving.LiveServer) -> None:
    """tiny-sdxl serves a tiny canny ControlNet: a unit changes the image; other kinds are
    refused at submission, listing what is served."""
    base = {"prompt": "a house", "seed": 3, **SMALL}
    unit = {"module": "canny", "model": "diffusers_xl_canny_mid", "input_image": square_b64()}
    outputs = []
    for extra in ({}, {"alwayson_scripts": {"controlnet": {"units": [unit]}}}):
        r = submit(scc, {**base, **extra})
        assert r.status_code == 200, r.text
        data = wait_result(scc, r.json()["data"]["taskId"])["data"]
        assert data["status"] == "succeeded", data
        outputs.append(httpx.get(data["images"][0]).content)
    assert outputs[0] != outputs[1], "the ControlNet unit did not change the image"
    r = submit(scc, {**base, "alwayson_scripts": {"controlnet": {"units": [
        {**unit, "module": "depth_midas", "model": "diffusers_xl_depth_mid"}]}}})
    assert r.status_code == 400, r.text
    assert "canny" in r.json()["message"]
