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


def test_a_task_waiting_in_the_engine_is_pending_everywhere(tmp_path: Any,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Taken by the runner but behind another batch: PENDING in the task, in the list's
    status filter, cancellable, and never scheduled; results that vanish read as UNKNOWN."""
    import asyncio
    import shutil

    import dashscope
    from dashscope import ImageSynthesis

    runner = fakes.FakeRunner()
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(runner),
                             job_concurrency=4, max_batch_images=1) as live:
        monkeypatch.setattr(dashscope, "base_http_api_url", live.url + "/api/v1")
        monkeypatch.setattr(dashscope, "api_key", "anything")
        jobs = live.app.state.ctx.jobs
        runner.hold()
        first = ImageSynthesis.async_call(model="stable-diffusion-xl", prompt="a", **SMALL)
        assert runner.entered.wait(60), "the first task never reached the runner"
        second = ImageSynthesis.async_call(model="stable-diffusion-xl", prompt="b", **SMALL)
        deadline = time.monotonic() + 60
        while jobs.running < 2:
            assert time.monotonic() < deadline, "the second task never reached the engine"
            time.sleep(0.02)
        first_id, second_id = first.output.task_id, second.output.task_id
        assert ImageSynthesis.fetch(second).output.task_status == "PENDING"
        assert _ids(ImageSynthesis.list(status="PENDING")) == [second_id]
        assert _ids(ImageSynthesis.list(status="RUNNING")) == [first_id]
        assert ImageSynthesis.cancel(second).status_code == 200
        cancelled = httpx.get(f"{live.url}/api/v1/tasks/{second_id}").json()["output"]
        assert cancelled["task_status"] == "CANCELED" and "scheduled_time" not in cancelled
        assert ImageSynthesis.fetch(first).output.scheduled_time
        runner.release()
        while jobs.store.get(first_id).status != "completed":
            assert time.monotonic() < deadline, "the first task never finished"
            time.sleep(0.05)
        # Two readers at once copy the images to /media once, and answer the same URLs.
        tasks = jobs.handlers["dashscope"].tasks
        job = jobs.store.get(first_id)

        async def two_readers() -> list[list[str]]:
            return await asyncio.gather(tasks.media_urls(job, live.url),
                                        tasks.media_urls(job, live.url))

        both = asyncio.run_coroutine_threadsafe(two_readers(),
                                                jobs._loops[0].get_loop()).result(60)
        assert both[0] == both[1] and len(both[0]) == 1
        assert len(list((tmp_path / "data" / "media").iterdir())) == 1
        # A finished task whose results are gone (never copied to /media): UNKNOWN, not a 500.
        later = ImageSynthesis.call(model="stable-diffusion-xl", prompt="c", **SMALL)
        assert later.output.task_status == "SUCCEEDED"
        task = ImageSynthesis.async_call(model="stable-diffusion-xl", prompt="d", **SMALL)
        task_id = task.output.task_id
        while jobs.store.get(task_id).status != "completed":
            assert time.monotonic() < deadline, "the last task never finished"
            time.sleep(0.05)
        shutil.rmtree(jobs.store.results_dir / task_id)
        gone = ImageSynthesis.fetch(task_id)
        assert gone.status_code == 200 and gone.output.task_status == "UNKNOWN", gone
        assert ImageSynthesis.fetch("x" * 5000).output.task_id == "x" * 64 + "…"


# -- the task list (GET /api/v1/tasks, the SDK's ImageSynthesis.list) --------------------------

LIST_KEYS = ("list-key-a", "list-key-b")


@pytest.fixture
def lister(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fake-model server with two keys; the SDK points at it (key A by default)."""
    import dashscope
    from dashscope import ImageSynthesis

    runner = fakes.FakeRunner()
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(runner),
                             job_concurrency=1, api_keys=",".join(LIST_KEYS)) as live:
        monkeypatch.setattr(dashscope, "base_http_api_url", live.url + "/api/v1")
        monkeypatch.setattr(dashscope, "api_key", LIST_KEYS[0])
        try:
            yield {"sdk": ImageSynthesis, "runner": runner, "url": live.url}
        finally:
            runner.release()


def _ids(rsp: Any) -> list[str]:
    assert rsp.status_code == 200, rsp
    return [t["task_id"] for t in rsp.output["data"]]


def _local(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(t))


def test_list_own_tasks_newest_first_filtered_and_paged(lister: dict[str, Any]) -> None:
    sdk, runner = lister["sdk"], lister["runner"]
    other = sdk.call(model="stable-diffusion-xl", prompt="b", api_key=LIST_KEYS[1], **SMALL)
    assert other.output.task_status == "SUCCEEDED", other
    done = [sdk.call(model=m, prompt="a", **SMALL).output.task_id
            for m in ("stable-diffusion-xl", "wanx-v1", "stable-diffusion-xl")]
    runner.hold()
    running = sdk.async_call(model="stable-diffusion-xl", prompt="a", **SMALL).output.task_id
    assert runner.entered.wait(60), "the running task never reached the runner"
    submitted = sdk.async_call(model="stable-diffusion-xl", prompt="a", **SMALL)
    pending = submitted.output.task_id
    newest_first = [pending, running, *reversed(done)]

    everything = sdk.list()
    assert _ids(everything) == newest_first  # key B's task is not there
    out = everything.output
    assert (out["total"], out["total_page"], out["page_no"], out["page_size"]) == (5, 1, 1, 10)
    assert everything.request_id and "request_id" not in out
    by_id = {t["task_id"]: t for t in out["data"]}
    assert [by_id[i]["status"] for i in newest_first] == [
        "PENDING", "RUNNING", "SUCCEEDED", "SUCCEEDED", "SUCCEEDED"]
    assert by_id[done[1]]["model_name"] == "wanx-v1"
    assert by_id[done[1]]["user_api_unique_key"].endswith(":image-synthesis:wanx-v1")
    key_ids = {t["api_key_id"] for t in out["data"]}
    assert len(key_ids) == 1
    mine = key_ids.pop()
    first = by_id[done[0]]
    assert first["start_time"] >= first["gmt_create"] and first["end_time"] >= first["start_time"]
    assert abs(first["gmt_create"] / 1000 - time.time()) < 600
    assert "end_time" not in by_id[pending]
    assert by_id[pending]["request_id"] == submitted.request_id  # the submission's

    assert _ids(sdk.list(status="SUCCEEDED")) == list(reversed(done))
    assert _ids(sdk.list(status="PENDING")) == [pending]
    assert _ids(sdk.list(status="RUNNING")) == [running]
    assert _ids(sdk.list(status="CANCELED")) == []
    assert _ids(sdk.list(model_name="wanx-v1")) == [done[1]]
    assert _ids(sdk.list(api_key_id=mine, status="SUCCEEDED", page_size=1)) == [done[2]]

    pages = [sdk.list(page_no=n, page_size=2) for n in (1, 2, 3, 4)]
    assert [_ids(p) for p in pages] == [newest_first[:2], newest_first[2:4], newest_first[4:], []]
    assert {(p.output["total"], p.output["total_page"]) for p in pages} == {(5, 3)}

    now = time.time()
    assert _ids(sdk.list(start_time=_local(now - 3600), end_time=_local(now + 60))) == \
        newest_first
    assert _ids(sdk.list(start_time=_local(now + 120))) == []
    assert _ids(sdk.list(end_time=_local(now - 3600))) == []

    theirs = sdk.list(api_key=LIST_KEYS[1])
    assert _ids(theirs) == [other.output.task_id]
    their_id = theirs.output["data"][0]["api_key_id"]
    assert their_id != mine
    assert _ids(sdk.list(api_key_id=their_id)) == []  # only one's own tasks, ever

    # task_id (in DashScope's docs, not the SDK's arguments): that task if it is the caller's.
    url, auth = lister["url"] + "/api/v1/tasks", {"authorization": f"Bearer {LIST_KEYS[0]}"}
    one = httpx.get(url, params={"task_id": done[1]}, headers=auth).json()
    assert [t["task_id"] for t in one["data"]] == [done[1]] and one["total"] == 1
    for params in ({"task_id": other.output.task_id},  # key B's task
                   {"task_id": done[1], "status": "PENDING"},
                   {"task_id": done[1], "page_no": 2}):
        none = httpx.get(url, params=params, headers=auth).json()
        assert none["data"] == [] and none["total"] == (1 if "page_no" in params else 0), params
    # The vendor's own curl example ends the path with a slash.
    assert [t["task_id"] for t in httpx.get(url + "/", headers=auth).json()["data"]] == \
        newest_first

    assert sdk.cancel(pending).status_code == 200
    assert _ids(sdk.list(status="CANCELED")) == [pending]
    runner.release()
    deadline = time.monotonic() + 60
    while _ids(sdk.list(status="SUCCEEDED")) != [running, *reversed(done)]:
        assert time.monotonic() < deadline, "the running task never finished"
        time.sleep(0.05)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"page_size": 0}, "page_size"),
    ({"page_size": 101}, "page_size"),
    ({"page_no": 0}, "page_no"),
    ({"page_no": "two"}, "page_no"),
    ({"page_no": "9" * 5000}, "page_no"),
    ({"status": "DONE"}, "status"),
    ({"start_time": "2023-04-20"}, "start_time"),
    ({"end_time": "20231340000000"}, "end_time"),
    ({"start_time": "20230421000000", "end_time": "20230420000000"}, "start_time"),
    ({"start_time": "20230420000000", "end_time": "20230421000001"}, "end_time"),
    ({"region": "cn beijing"}, "region"),
    ({"model_name": "x" * 200}, "model_name"),
])
def test_list_bad_parameters_are_400s_naming_them(sdk: Any, kwargs: dict[str, Any], field: str
                                                  ) -> None:
    rsp = sdk.list(**kwargs)
    assert rsp.status_code == 400, rsp
    assert rsp.code == "InvalidParameter" and field in rsp.message, rsp
    assert rsp.request_id


def test_list_refuses_repeats_and_strangers(ds: serving.LiveServer, sdk: Any) -> None:
    url = f"{ds.url}/api/v1/tasks"
    r = httpx.get(url, params=[("status", "PENDING"), ("status", "RUNNING")],
                  headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"request_id", "code", "message"} and "status" in body["message"]
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    stranger = sdk.list(api_key="wrong")
    assert stranger.status_code == 401 and stranger.code == "InvalidApiKey"
    # A full 24-hour range, empty values and unknown parameters are fine.
    ok = httpx.get(url, params={"start_time": "20230420000000", "end_time": "20230421000000",
                                "model_name": "", "foo": "bar"},
                   headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"] == [] and ok.json()["total"] == 0
