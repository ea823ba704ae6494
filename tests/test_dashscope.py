"""DashScope image synthesis through the real ``dashscope`` SDK over a socket (base URL
overridden with ``dashscope.base_http_api_url``), plus the raw wire where the SDK hides it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests import fakes, serving

KEY = "test-key"
SMALL: dict[str, Any] = {"size": "64*64", "steps": 2}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    with serving.live_server(tmp_path_factory.mktemp("dashscope"), api_keys=KEY,
                             warmup_sizes="64x64") as live:
        yield live


@pytest.fixture
def sdk(ds: serving.LiveServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    import dashscope
    from dashscope import ImageSynthesis

    monkeypatch.setattr(dashscope, "base_http_api_url", ds.url + "/api/v1")
    monkeypatch.setattr(dashscope, "api_key", KEY)
    return ImageSynthesis


def image_size(url: str) -> tuple[int, int]:
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content)).size


def test_call_waits_and_returns_urls(sdk: Any) -> None:
    rsp = sdk.call(model="stable-diffusion-xl", prompt="a red fox", negative_prompt="blurry",
                   n=2, seed=7, **SMALL)
    assert rsp.status_code == 200, rsp
    assert rsp.output.task_status == "SUCCEEDED"
    assert len(rsp.output.results) == 2
    assert [image_size(r.url) for r in rsp.output.results] == [(64, 64), (64, 64)]
    assert rsp.usage.image_count == 2
    assert rsp.output.task_metrics == {"TOTAL": 2, "SUCCEEDED": 2, "FAILED": 0}
    assert rsp.request_id


def test_async_call_fetch_wait(sdk: Any) -> None:
    task = sdk.async_call(model="stable-diffusion-xl", prompt="a boat", **SMALL)
    assert task.status_code == 200, task
    assert task.output.task_status in ("PENDING", "RUNNING")
    assert sdk.fetch(task).output.task_status in ("PENDING", "RUNNING", "SUCCEEDED")
    done = sdk.wait(task)
    assert done.output.task_status == "SUCCEEDED"
    assert done.output.task_id == task.output.task_id
    assert image_size(done.output.results[0].url) == (64, 64)
    # fetch by id string afterwards gives the same result.
    again = sdk.fetch(task.output.task_id)
    assert again.output.task_status == "SUCCEEDED"
    assert again.output.submit_time and again.output.end_time


def test_sync_call_without_async_header(sdk: Any) -> None:
    rsp = sdk.sync_call(model="stable-diffusion-xl", prompt="a tree", **SMALL)
    assert rsp.status_code == 200, rsp
    assert rsp.output.task_status == "SUCCEEDED" and len(rsp.output.results) == 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"model": "qwen-image"}, "model"),
    ({"size": "65*64"}, "parameters.size"),
    ({"size": "big"}, "parameters.size"),
    ({"n": 5}, "parameters.n"),
    ({"seed": -1}, "parameters.seed"),
    ({"steps": 0}, "parameters.steps"),
    ({"scale": 30}, "parameters.scale"),
    ({"style": "<anime>"}, "parameters.style"),
    ({"ref_img": "https://example.com/a.png"}, "input.ref_img"),
    ({"prompt": "x" * 9000}, "input.prompt"),
    ({"size": "\u00b2*64"}, "parameters.size"),  # "²": isdigit() but not int()
    ({"size": "9" * 5000 + "*64"}, "parameters.size"),
])
def test_bad_input_is_a_400_naming_the_field(sdk: Any, kwargs: dict[str, Any], field: str
                                             ) -> None:
    args = {"model": "stable-diffusion-xl", "prompt": "x", **SMALL, **kwargs}
    rsp = sdk.async_call(**args)
    assert rsp.status_code == 400, rsp
    assert rsp.code == "InvalidParameter" and field in rsp.message, rsp
    assert rsp.request_id


def test_auth_unknown_task_and_cancel_refusal(sdk: Any) -> None:
    rsp = sdk.async_call(model="stable-diffusion-xl", prompt="x", api_key="wrong", **SMALL)
    assert rsp.status_code == 401 and rsp.code == "InvalidApiKey"
    unknown = sdk.fetch("no-such-task")
    assert unknown.status_code == 200 and unknown.output.task_status == "UNKNOWN"
    assert sdk.wait("no-such-task").output.task_status == "UNKNOWN"
    refused = sdk.cancel("no-such-task")
    assert refused.status_code == 400 and refused.code == "UnsupportedOperation"


def test_other_keys_see_unknown_and_image_edit_is_refused(ds: serving.LiveServer,
                                                          sdk: Any) -> None:
    done = sdk.call(model="stable-diffusion-xl", prompt="x", **SMALL)
    url = f"{ds.url}/api/v1/tasks/{done.output.task_id}"
    assert httpx.get(url, headers={"authorization": f"Bearer {KEY}"}).json()["output"][
        "task_status"] == "SUCCEEDED"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    r = httpx.post(f"{ds.url}/api/v1/services/aigc/image2image/image-synthesis",
                   json={"model": "wanx2.1-imageedit", "input": {"prompt": "x"}},
                   headers={"authorization": f"Bearer {KEY}", "x-dashscope-async": "enable"})
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    r = httpx.post(f"{ds.url}/api/v1/services/aigc/text2image/image-synthesis",
                   content=b"{nope", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()) == {"request_id", "code", "message"}


def test_cancel_a_pending_task(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import dashscope
    from dashscope import ImageSynthesis

    runner = fakes.FakeRunner()
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(runner),
                             job_concurrency=1) as live:
        monkeypatch.setattr(dashscope, "base_http_api_url", live.url + "/api/v1")
        monkeypatch.setattr(dashscope, "api_key", "anything")
        runner.hold()
        first = ImageSynthesis.async_call(model="stable-diffusion-xl", prompt="a", **SMALL)
        assert runner.entered.wait(60), "the first task never reached the runner"
        second = ImageSynthesis.async_call(model="stable-diffusion-xl", prompt="b", **SMALL)
        assert ImageSynthesis.fetch(first).output.task_status == "RUNNING"
        assert ImageSynthesis.fetch(second).output.task_status == "PENDING"
        assert ImageSynthesis.cancel(second).status_code == 200
        assert ImageSynthesis.fetch(second).output.task_status == "CANCELED"
        refused = ImageSynthesis.cancel(first)
        assert refused.status_code == 400 and refused.code == "UnsupportedOperation"
        runner.release()
        deadline = time.monotonic() + 60
        while ImageSynthesis.fetch(first).output.task_status != "SUCCEEDED":
            assert time.monotonic() < deadline, "the first task never finished"
            time.sleep(0.05)
