"""OpenAI streaming (``stream=true``, Server-Sent Events) through the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image

from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

FAST = {"num_inference_steps": 4}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 30)).save(out, format="PNG")
    return out.getvalue()


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_generate_stream_gives_partials_then_completed(server):
    events = list(client(server.url).images.generate(
        prompt="a red kite", size="64x64", stream=True, partial_images=2,
        extra_body={**FAST, "seed": 5}))
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert size_of(e.b64_json) == (64, 64)
        assert e.size == "64x64" and e.output_format == "png" and e.background == "opaque"
    done = events[-1]
    assert done.usage.output_tokens == 16 and done.usage.input_tokens > 0
    # The streamed final image is the image a plain request makes.
    plain = client(server.url).images.generate(
        prompt="a red kite", size="64x64", response_format="b64_json",
        extra_body={**FAST, "seed": 5})
    assert done.b64_json == plain.data[0].b64_json


def test_stream_without_partials_and_n2_gives_one_completed_per_image(server):
    events = list(client(server.url).images.generate(
        prompt="x", size="64x64", n=2, stream=True, output_format="jpeg", extra_body=FAST))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert events[0].b64_json != events[1].b64_json
    assert base64.b64decode(events[0].b64_json)[:3] == b"\xff\xd8\xff"
    assert events[0].usage.input_tokens > 0 and events[1].usage.input_tokens == 0


def test_async_stream_of_an_edit(server):
    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                      max_retries=0) as c:
            stream = await c.images.edit(
                image=("a.png", png_bytes(), "image/png"), prompt="snow", stream=True,
                partial_images=1, extra_body={**FAST, "strength": 1.0})
            return [e async for e in stream]

    events = asyncio.run(main())
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert size_of(events[-1].b64_json) == (64, 64)


def test_errors_before_the_stream_are_json(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server.url).images.generate(prompt="x", size="100x100", stream=True,
                                           partial_images=1)
    assert err.value.param == "size"


def test_failure_after_the_stream_started_is_an_error_event(tmp_path):
    runner = FakeRunner(fail=lambda batch: None if batch.slots[0].ticket.prompt == "warm-up"
                        else RuntimeError("boom"))
    with live_server(tmp_path, engine_factory=engine_factory(runner)) as srv:
        stream = client(srv.url).images.generate(prompt="x", size="64x64", stream=True,
                                                 extra_body=FAST)
        with pytest.raises(openai.APIError) as err:
            list(stream)
        assert err.value.message
        assert srv.metric("imagegate_errors_total", {"dialect": "openai",
                                                      "cause": "internal"}) == 1


def test_disconnect_frees_the_queue_slot_and_others_run(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner, max_batch_images=1)) as srv:
        runner.hold()
        first: dict = {}

        def blocking() -> None:
            first["resp"] = client(srv.url).images.generate(
                prompt="holder", size="64x64", response_format="b64_json", extra_body=FAST)

        holder = threading.Thread(target=blocking)
        holder.start()
        assert runner.entered.wait(60), "the first request never reached the runner"
        with httpx.Client(timeout=60) as http, http.stream(
            "POST", srv.url + "/v1/images/generations",
            json={"prompt": "leaver", "size": "64x64", "stream": True, **FAST},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            wait_for("the streaming request to be queued",
                     lambda: srv.metric("imagegate_queue_requests") == 1)
        # The client went away: its queued request is dropped while the runner still holds.
        wait_for("the queue to empty after the disconnect",
                 lambda: srv.metric("imagegate_queue_requests") == 0)
        runner.release()
        holder.join(60)
        assert "resp" in first
        after = client(srv.url).images.generate(prompt="after", size="64x64",
                                                response_format="b64_json", extra_body=FAST)
        assert after.data[0].b64_json
        prompts = [p for batch in runner.batches for p, _ in batch if p != "warm-up"]
        assert prompts == ["holder", "after"]


def test_streaming_and_plain_requests_share_a_batch(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner, max_batch_images=4)) as srv:
        runner.hold()
        out: dict = {}

        def plain(prompt: str) -> None:
            out[prompt] = client(srv.url).images.generate(
                prompt=prompt, size="64x64", response_format="b64_json", extra_body=FAST)

        def streaming() -> None:
            out["stream"] = list(client(srv.url).images.generate(
                prompt="streamed", size="64x64", stream=True, extra_body=FAST))

        threads = [threading.Thread(target=plain, args=("holder",))]
        threads[0].start()
        assert runner.entered.wait(60), "the first request never reached the runner"
        threads += [threading.Thread(target=streaming),
                    threading.Thread(target=plain, args=("plain",))]
        for t in threads[1:]:
            t.start()
        wait_for("both requests to be queued", lambda: srv.metric("imagegate_queue_requests") == 2)
        runner.release()
        for t in threads:
            t.join(60)
        assert [e.type for e in out["stream"]] == ["image_generation.completed"]
        assert "plain" in out
        batches = [sorted(p for p, _ in batch) for batch in runner.batches
                   if batch[0][0] != "warm-up"]
        assert batches == [["holder"], ["plain", "streamed"]]
