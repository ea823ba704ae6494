"""OpenAI image edits and variations through the real ``openai`` SDK over a socket."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.fakes import FakeRunner, engine_factory
from tests.serving import live_server

FAST = {"num_inference_steps": 2}


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def png_bytes(size: tuple[int, int] = (64, 64), color: tuple[int, ...] = (200, 40, 40),
              mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def transparent_mask(size: tuple[int, int] = (64, 64)) -> bytes:
    """Opaque everywhere except a transparent left half (the area to repaint)."""
    alpha = np.full((size[1], size[0]), 255, dtype=np.uint8)
    alpha[:, : size[0] // 2] = 0
    rgba = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_edit_with_mask_repaints_only_the_transparent_area(server):
    source = png_bytes()
    resp = client(server.url).images.edit(
        image=("in.png", source, "image/png"), mask=("mask.png", transparent_mask(), "image/png"),
        prompt="a blue sky", response_format="b64_json", extra_body={**FAST, "seed": 3},
    )
    out = np.asarray(decode(resp.data[0].b64_json).convert("RGB")).astype(int)
    assert out.shape == (64, 64, 3)  # size auto: the input's size
    kept = out[:, 40:]  # well inside the opaque (kept) half
    assert np.abs(kept - np.array([200, 40, 40])).max() <= 3
    assert np.abs(out[:, :24] - np.array([200, 40, 40])).max() > 10, "masked half unchanged"
    assert resp.size == "64x64" and resp.usage is not None and resp.usage.output_tokens == 16


def test_an_opaque_mask_keeps_every_pixel_and_an_exotic_mode_mask_is_read(server):
    """OpenAI's rule: only transparent pixels are edited, so an opaque white mask keeps all.
    A mask in a mode Pillow cannot map to grayscale directly (LAB) is still a mask, not a 500."""
    source = png_bytes()
    opaque = client(server.url).images.edit(
        image=("in.png", source, "image/png"),
        mask=("mask.png", png_bytes(color=(255, 255, 255, 255), mode="RGBA"), "image/png"),
        prompt="a blue sky", response_format="b64_json", extra_body={**FAST, "seed": 3})
    out = np.asarray(decode(opaque.data[0].b64_json).convert("RGB")).astype(int)
    assert np.abs(out - np.array([200, 40, 40])).max() <= 3, "an opaque mask repainted pixels"
    lab = io.BytesIO()
    Image.new("LAB", (64, 64)).save(lab, format="TIFF")
    resp = client(server.url).images.edit(
        image=("in.png", source, "image/png"), mask=("mask.tiff", lab.getvalue(), "image/tiff"),
        prompt="x", response_format="b64_json", extra_body=FAST)
    assert decode(resp.data[0].b64_json).size == (64, 64)


def test_edit_without_mask_and_list_form_and_url_mode(server):
    # A one-element list goes out as the multipart part "image[]".
    resp = client(server.url).images.edit(
        image=[("in.png", png_bytes((96, 64)), "image/png")], prompt="make it green",
        size="64x64", n=2, extra_body={**FAST, "strength": 0.5},
    )
    assert len(resp.data) == 2
    for item in resp.data:
        got = httpx.get(item.url)
        assert got.status_code == 200
        assert Image.open(io.BytesIO(got.content)).size == (64, 64)


def test_variation_keeps_size_and_repeats_with_a_seed(server):
    c = client(server.url)
    kw = dict(image=("in.png", png_bytes((64, 64)), "image/png"), n=1,
              response_format="b64_json", extra_body={**FAST, "seed": 9})
    a = c.images.create_variation(**kw)
    b = c.images.create_variation(**kw)
    assert decode(a.data[0].b64_json).size == (64, 64)
    assert a.data[0].b64_json == b.data[0].b64_json


def test_async_client_edits_and_variations(server):
    async def main() -> tuple[openai.types.ImagesResponse, openai.types.ImagesResponse]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                      max_retries=0) as c:
            return await asyncio.gather(
                c.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="x",
                              response_format="b64_json", extra_body=FAST),
                c.images.create_variation(image=("b.png", png_bytes(), "image/png"),
                                          response_format="b64_json", extra_body=FAST),
            )

    edit, variation = asyncio.run(main())
    assert decode(edit.data[0].b64_json).size == (64, 64)
    assert decode(variation.data[0].b64_json).size == (64, 64)


def test_json_edit_form_takes_data_urls(server):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = httpx.post(server.url + "/v1/images/edits", json={
        "images": [{"image_url": data_url}], "prompt": "x", "response_format": "b64_json",
        **FAST}, timeout=120)
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    r = httpx.post(server.url + "/v1/images/edits", json={
        "images": [{"file_id": "file-123"}], "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "images.0.file_id"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"image": ("x.png", b"not an image", "image/png")}, "image"),
        ({"mask": ("m.png", png_bytes((32, 32), (0, 0, 0, 0), "RGBA"), "image/png")}, "mask"),
        ({"mask": ("m.png", b"garbage", "image/png")}, "mask"),
        ({"image": [("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")]},
         "image"),
        ({"n": 11}, "n"),
        ({"size": "100x100"}, "size"),
        ({"size": "9000x9000"}, "size"),
        ({"extra_body": {"strength": 0}}, "strength"),
        ({"extra_body": {"strength": 0.01, "num_inference_steps": 2}}, "strength"),
        ({"output_format": "gif"}, "output_format"),
        ({"markup": ("k.png", png_bytes(), "image/png")}, "markup"),
        ({"background": "transparent"}, "background"),
    ],
)
def test_bad_edits_are_400s_naming_the_field(server, kwargs, param):
    args = {"image": ("in.png", png_bytes(), "image/png"), "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(server.url).images.edit(**args)
    assert err.value.param == param, err.value.message
    assert err.value.type == "invalid_request_error"


def test_missing_image_and_non_multipart_are_400s(server):
    r = httpx.post(server.url + "/v1/images/edits", files={"prompt": (None, "x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(server.url + "/v1/images/variations", content=b"x",
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(server.url + "/v1/images/edits",
                   files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_text_parts_that_do_not_decode_are_400s_naming_the_part(server):
    # An image sent as a text part (curl -F 'image=<in.png': no filename), and a text field in
    # a charset Python does not know: Litestar decodes both as text and fails.
    boundary = "x1"

    def form(headers: str, value: bytes) -> bytes:
        return (f'--{boundary}\r\nContent-Disposition: form-data; {headers}\r\n\r\n'.encode()
                + value + f"\r\n--{boundary}--\r\n".encode())

    ctype = {"content-type": f"multipart/form-data; boundary={boundary}"}
    r = httpx.post(server.url + "/v1/images/variations", headers=ctype,
                   content=form('name="image"', png_bytes()))
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    assert "filename" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/images/edits", headers=ctype,
                   content=form('name="prompt"\r\nContent-Type: text/plain; charset=bogus', b"x"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    # A codec that fails with a plain UnicodeError rather than a UnicodeDecodeError.
    r = httpx.post(server.url + "/images/edits", headers=ctype,
                   content=form('name="size"\r\nContent-Type: text/plain; charset=punycode',
                                b"abc-9999999999"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "size", r.text


def test_a_form_with_too_many_parts_says_so(server):
    parts = {f"f{i}": (None, "x") for i in range(1500)}
    r = httpx.post(server.url + "/v1/images/edits",
                   files={"image": ("a.png", png_bytes(), "image/png"), **parts})
    assert r.status_code == 400
    assert "too many parts" in r.json()["error"]["message"], r.text


def test_large_input_is_shrunk_to_the_default_area(server):
    info = server.engine.info
    resp = client(server.url).images.create_variation(
        image=("big.png", png_bytes((info.default_width * 4, info.default_height * 2)),
               "image/png"), response_format="b64_json", extra_body=FAST)
    w, h = decode(resp.data[0].b64_json).size
    assert w * h <= info.default_width * info.default_height
    assert abs(w / h - 2) < 0.2 and w % 8 == 0 and h % 8 == 0


def test_pixel_limit_refuses_decompression_bombs(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner),
                     fetch_max_pixels=100 * 100) as srv:
        with pytest.raises(openai.BadRequestError) as err:
            client(srv.url).images.create_variation(
                image=("big.png", png_bytes((200, 200)), "image/png"))
        assert err.value.param == "image" and "pixel" in err.value.message
        assert [p for batch in runner.batches for p, _ in batch if p != "warm-up"] == []
