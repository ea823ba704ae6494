"""Helpers the dialects share: size strings, A1111 sampler names, inline/remote image loading,
and the order of admission and image fetching in AUTOMATIC1111 and Alibaba SCC."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.dialects.a1111 import UnsupportedScheduler, a1111_sampler, decode_b64_image
from gateway.dialects.alibaba_scc import Txt2ImgRequest, inline_image, sampler_for
from gateway.errors import ApiError
from gateway.fetch import FetchPolicy, FetchRefused, check_image, load_image
from gateway.sizes import parse_size
from tests import fakes, serving


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(("text", "kwargs", "expected"), [
    ("1024x768", {}, (1024, 768)),
    (" 64X128 ", {}, (64, 128)),
    ("64 x 64", {}, None),
    ("64 x 64", {"spaces": True}, (64, 64)),
    ("64*64", {}, None),
    ("64*64", {"separators": "*x"}, (64, 64)),
    ("64x64", {"separators": "*x"}, (64, 64)),
    ("1024 * 1024", {"separators": "*x", "spaces": True}, (1024, 1024)),
    ("64x64x64", {}, None),
    ("x64", {}, None),
    ("64", {}, None),
    ("auto", {}, None),
    ("\u00b2x64", {}, None),  # isdigit() but not a size
    ("+64x64", {"spaces": True}, None),
    ("6_4x64", {"spaces": True}, None),
    ("123456x64", {}, None),
    ("9" * 5000 + "x64", {}, None),
])
def test_parse_size(text: str, kwargs: dict[str, Any], expected: tuple[int, int] | None) -> None:
    assert parse_size(text, **kwargs) == expected


def test_errors_inside_a_mapping_name_the_mapping() -> None:
    import msgspec

    from gateway.wire import decode_json

    class Body(msgspec.Struct):
        input: dict[str, Any]
        sizes: dict[str, list[int]] = {}

    with pytest.raises(ApiError) as err:
        decode_json(b'{"input": {"guidance_scale": 1e309}}', Body)
    failure = err.value.failure
    assert failure.field == "input" and "'input'" in failure.message, failure.message
    with pytest.raises(ApiError) as err:
        decode_json(b'{"input": {}, "sizes": {"a": [1, "x"]}}', Body)
    assert err.value.failure.field == "sizes.1", err.value.failure


def test_a1111_sampler_names() -> None:
    assert a1111_sampler("k_dpmpp_2m", None) == "DPM++ 2M"
    assert a1111_sampler(" K_EULER_A ", "automatic") == "Euler a"
    assert a1111_sampler("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert a1111_sampler("k_dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert a1111_sampler("DPM++ 2M Karras", "karras") == "DPM++ 2M Karras"
    assert a1111_sampler("Nope", None) == "Nope"  # the registry decides what is unknown
    with pytest.raises(UnsupportedScheduler):
        a1111_sampler("Euler", "exponential")


def test_scc_resolves_samplers_as_a1111() -> None:
    def body(**fields: Any) -> Txt2ImgRequest:
        return Txt2ImgRequest(**fields)

    assert sampler_for(body()) == "Euler"
    assert sampler_for(body(sampler_name="k_euler_a")) == "Euler a"
    assert sampler_for(body(sampler_index="k_dpmpp_2m", scheduler="karras")) == \
        "DPM++ 2M Karras"
    with pytest.raises(ApiError) as err:
        sampler_for(body(scheduler="exponential"))
    assert err.value.failure.field == "scheduler"
    assert "sampler_name such as" in err.value.failure.message


def test_load_image_inline_forms_and_refusals() -> None:
    policy = FetchPolicy(max_bytes=10_000, max_pixels=400)
    data = png()
    b64 = base64.b64encode(data).decode()

    def load(value: str, decode: Any) -> bytes:
        return asyncio.run(load_image(value, "init", policy, decode))

    assert load(b64, lambda t: inline_image(t, policy.max_bytes)) == data
    assert load(f"data:image/png;base64,{b64}", lambda t: inline_image(t, policy.max_bytes)) \
        == data
    assert load(f"data:image/png;base64,{b64}",
                lambda t: decode_b64_image(t, "init", policy.max_bytes)) == data
    # Refusals become a 400 naming the field, whatever the decoder's own words.
    cases = [
        ("not base64!", lambda t: inline_image(t, policy.max_bytes), "not valid base64"),
        (base64.b64encode(png((32, 32))).decode(), lambda t: inline_image(t, policy.max_bytes),
         "pixel limit"),
        (base64.b64encode(b"text").decode(), lambda t: inline_image(t, policy.max_bytes),
         "not a readable image"),
        ("http://127.0.0.1/x.png", lambda t: pytest.fail("a URL is never decoded"),
         "loopback"),
        ("ftp://example.com/x.png", lambda t: inline_image(t, policy.max_bytes),
         "not valid base64"),
    ]
    for value, decode, words in cases:
        with pytest.raises(ApiError) as err:
            load(value, decode)
        failure = err.value.failure
        assert failure.status == 400 and failure.field == "init", value
        assert failure.message.startswith("init: ") and words in failure.message, failure.message
    with pytest.raises(FetchRefused):
        inline_image("A" * 20_000, policy.max_bytes)


def test_an_image_past_pillows_own_ceiling_names_this_servers_limit() -> None:
    """A PNG header declaring 20000×20000 pixels (Pillow refuses it on open, before the size
    check can read it): the refusal names --fetch-max-pixels' limit, not Pillow's."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(FetchRefused) as err:
        check_image(bomb, 36_000_000)
    assert "36000000-pixel limit" in str(err.value), err.value
    assert "89478485" not in str(err.value)


class CountingImageServer:
    """Serves one PNG at any path and counts the GETs."""

    def __init__(self) -> None:
        self.hits = 0
        body = png((64, 64))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = fakes.QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/in.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def images() -> Iterator[CountingImageServer]:
    server = CountingImageServer()
    yield server
    server.close()


def test_no_image_url_is_fetched_for_a_client_out_of_quota(
        tmp_path: Any, capsys: pytest.CaptureFixture, images: CountingImageServer) -> None:
    from gateway.cli import main as cli

    keys_file = tmp_path / "keys.json"
    assert cli(["keys", "create", "--keys-file", str(keys_file), "--id", "d", "--daily", "3"]) == 0
    key = dict(re.findall(r"^(\w+):\s+(\S+)$", capsys.readouterr().out, re.M))["api_key"]
    auth = {"authorization": f"Bearer {key}"}
    a1111 = {"prompt": "x", "init_images": [images.url], "width": 64, "height": 64, "steps": 2}
    scc = {"prompt": "x", "init_images": [images.url], "width": 64, "height": 64, "steps": 2}
    edit = {"prompt": "x", "images": [{"image_url": images.url}], "size": "64x64",
            "response_format": "b64_json", "num_inference_steps": 2}
    with serving.live_server(tmp_path, engine_factory=fakes.engine_factory(fakes.FakeRunner()),
                             keys_file=str(keys_file), fetch_allow="127.0.0.1") as live:
        # Within the quota both fetch the URL (the counter works).
        r = httpx.post(f"{live.url}/sdapi/v1/img2img", json=a1111, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{live.url}/scc/sd_img2img", json=scc, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{live.url}/v1/images/edits", json=edit, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        assert images.hits == 3
        # The daily quota is spent: refused before anything is fetched, in each envelope.
        r = httpx.post(f"{live.url}/sdapi/v1/img2img", json=a1111, headers=auth, timeout=120)
        assert r.status_code == 429, r.text
        r = httpx.post(f"{live.url}/scc/sd_img2img", json=scc, headers=auth, timeout=120)
        assert r.status_code == 429 and r.json()["code"] == "QuotaExceeded", r.text
        r = httpx.post(f"{live.url}/v1/images/edits", json=edit, headers=auth, timeout=120)
        assert r.status_code == 429 and r.json()["error"]["type"], r.text
        assert images.hits == 3
