"""RunPod ``GET /v2/{endpoint}/stream/{id}`` through the real ``runpod`` SDK (sync and async)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests import serving

KEY = "stream-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "refiner_inference_steps": 4}


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    with serving.live_server(tmp_path_factory.mktemp("rpstream"), api_keys=KEY,
                             warmup_sizes="64x64") as live:
        yield live


@pytest.fixture
def sdk(rp: serving.LiveServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    import runpod

    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", rp.url + "/v2")
    monkeypatch.setattr(runpod, "endpoint_url_base", rp.url + "/v2")
    monkeypatch.setattr(runpod, "api_key", KEY)
    return runpod


def image_size(data_uri: str) -> tuple[int, int]:
    payload = data_uri.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(payload))).size


def test_sync_job_stream_yields_the_output_once(sdk: Any, rp: serving.LiveServer) -> None:
    job = sdk.Endpoint("sdxl").run({"prompt": "a lantern", "seed": 4, **SMALL})
    chunks = list(job.stream())
    assert len(chunks) == 1
    out = chunks[0]
    assert out["seed"] == 4 and len(out["images"]) == 1
    assert image_size(out["images"][0]) == (64, 64)
    # Delivered once: later reads are final and empty; /status still has the output.
    again = httpx.get(f"{rp.url}/v2/sdxl/stream/{job.job_id}", headers=AUTH, timeout=60).json()
    assert again["status"] == "COMPLETED" and again["stream"] == []
    assert job.output(timeout=60) == out


def test_async_job_stream(sdk: Any) -> None:
    from runpod.endpoint.asyncio.asyncio_runner import Endpoint
    from runpod.http_client import AsyncClientSession

    async def main() -> tuple[list[Any], Any]:
        async with AsyncClientSession() as session:
            job = await Endpoint("sdxl", session).run({"prompt": "a kettle", **SMALL})
            chunks = [chunk async for chunk in job.stream()]
            return chunks, await job.output(timeout=60)

    chunks, output = asyncio.run(main())
    assert len(chunks) == 1 and chunks[0] == output
    assert image_size(output["image_url"]) == (64, 64)


def test_failed_job_streams_nothing_and_ends(sdk: Any, rp: serving.LiveServer) -> None:
    job = sdk.Endpoint("sdxl").run({"prompt": "x", "num_images": 5})
    assert list(job.stream()) == []
    body = httpx.get(f"{rp.url}/v2/sdxl/stream/{job.job_id}", headers=AUTH, timeout=60).json()
    assert body["status"] == "FAILED" and "num_images" in body["error"]


def test_unknown_job_is_a_404_with_a_status(sdk: Any, rp: serving.LiveServer) -> None:
    r = httpx.get(f"{rp.url}/v2/sdxl/stream/nope", headers=AUTH, timeout=60)
    assert r.status_code == 404
    assert r.json()["status"] == "FAILED" and r.json()["error"]
    from runpod.endpoint.asyncio.asyncio_runner import Job
    from runpod.http_client import AsyncClientSession

    async def main() -> list[Any]:
        async with AsyncClientSession() as session:
            job = Job("sdxl", "nope", session, {"Authorization": f"Bearer {KEY}"})
            return [chunk async for chunk in job.stream()]

    assert asyncio.run(main()) == []  # ends instead of the KeyError: 'status' it used to raise
