"""Baidu Qianfan sd_xl dialect and its OAuth token endpoint, over a real socket.

The happy path goes through the real ``qianfan`` SDK (token fetch + sd_xl); error cases use httpx
so the exact wire body can be asserted.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import msgspec
import pytest
from PIL import Image

from auth.keys import KeysFile, new_client, save_keys_file
from gateway.dialects.baidu import SD_XL_PATH, TOKEN_PATH, baidu_prompt_tokens
from tests.serving import live_server

SECRET = "test-signing-secret-0123456789abcdef"
FAST = {"size": "768x768", "steps": 10}


@pytest.fixture(scope="module")
def baidu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baidu")
    app, app_key, app_secret = new_client("app")
    only_openai, _, oo_secret = new_client("only-openai", scopes=["openai"])
    keys_file = tmp / "keys.json"
    save_keys_file(keys_file, KeysFile(clients=[app, only_openai]))
    with live_server(tmp, keys_file=str(keys_file), token_secret=SECRET) as live:
        live.creds = {"app": (app_secret, app_key), "only-openai": (oo_secret, None)}
        yield live


def get_token(url: str, cid: str, secret: str, method: str = "GET") -> httpx.Response:
    params = {"grant_type": "client_credentials", "client_id": cid, "client_secret": secret}
    return httpx.request(method, url + TOKEN_PATH, params=params)


def token_of(live, cid: str = "app") -> str:
    resp = get_token(live.url, cid, live.creds[cid][0])
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def sd_xl(live, token: str | None, body: dict | bytes) -> dict:
    params = {"access_token": token} if token is not None else {}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(live.url + SD_XL_PATH, params=params, timeout=120, **kw)
    assert resp.status_code == 200, resp.text  # Baidu answers errors with HTTP 200 too
    return resp.json()


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_token_endpoint_get_post_and_form(baidu):
    secret = baidu.creds["app"][0]
    for method in ("GET", "POST"):
        body = get_token(baidu.url, "app", secret, method).json()
        assert set(body) >= {"access_token", "expires_in", "refresh_token", "scope",
                             "session_key", "session_secret"}
        assert body["expires_in"] == 2592000
        assert body["access_token"].startswith("24.")
    form = httpx.post(baidu.url + TOKEN_PATH, data={
        "grant_type": "client_credentials", "client_id": "app", "client_secret": secret})
    assert form.status_code == 200 and "access_token" in form.json()


def test_token_errors(baidu):
    wrong = get_token(baidu.url, "app", "not-the-secret").json()
    assert wrong == {"error": "invalid_client", "error_description": "Client authentication failed"}
    unknown = get_token(baidu.url, "nobody", "x").json()
    assert unknown == {"error": "invalid_client", "error_description": "unknown client id"}
    grant = httpx.get(baidu.url + TOKEN_PATH, params={
        "grant_type": "password", "client_id": "app", "client_secret": baidu.creds["app"][0]})
    assert grant.json()["error"] == "unsupported_grant_type"


def test_qianfan_sdk_round_trip(baidu, monkeypatch):
    qianfan = pytest.importorskip("qianfan")
    monkeypatch.setenv("QIANFAN_BASE_URL", baidu.url)
    monkeypatch.setenv("QIANFAN_AK", "app")
    monkeypatch.setenv("QIANFAN_SK", baidu.creds["app"][0])
    monkeypatch.setenv("QIANFAN_ENABLE_AUTH_CACHE", "False")
    from qianfan.config import get_config

    get_config.cache_clear() if hasattr(get_config, "cache_clear") else None
    t2i = qianfan.Text2Image(model="Stable-Diffusion-XL", ak="app", sk=baidu.creds["app"][0])
    resp = t2i.do(prompt="一只猫 on a red sofa", negative_prompt="blurry", size="576x1024",
                  steps=10, n=1, seed=7, with_decode="base64",
                  # The SDK's default is 60 s; a busy 2-core CI machine can take longer.
                  request_timeout=600, retry_count=1)
    body = resp.body
    assert body["object"] == "image" and body["id"].startswith("as-")
    assert [d["index"] for d in body["data"]] == [1]
    for d in body["data"]:
        img = Image.open(io.BytesIO(d["image"]))
        assert img.format == "PNG" and img.size == (576, 1024)
    assert body["usage"]["prompt_tokens"] == baidu_prompt_tokens("一只猫 on a red sofa", "blurry")


def test_bad_signature_is_110_and_missing_token_is_110(baidu):
    token = token_of(baidu)
    head, payload, sig = token.rsplit(".", 2)
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    assert sd_xl(baidu, forged, {"prompt": "cat", **FAST})["error_code"] == 110
    # A token signed by another replica's secret is refused too.
    other = baidu.app.state.ctx.tokens.__class__("another-secret-000000000000000000").issue("app")
    assert sd_xl(baidu, other, {"prompt": "cat", **FAST})["error_code"] == 110
    assert sd_xl(baidu, None, {"prompt": "cat", **FAST})["error_code"] == 110
    assert sd_xl(baidu, "garbage", {"prompt": "cat", **FAST})["error_code"] == 110


def test_expired_token_is_111(baidu):
    tokens = baidu.app.state.ctx.tokens
    token = token_of(baidu)
    real = tokens.clock
    tokens.clock = lambda: real() + tokens.ttl_s + 1
    try:
        body = sd_xl(baidu, token, {"prompt": "cat", **FAST})
    finally:
        tokens.clock = real
    assert body["error_code"] == 111 and "expired" in body["error_msg"].lower()


def test_client_not_scoped_for_baidu(baidu):
    token = token_of(baidu, "only-openai")
    body = sd_xl(baidu, token, {"prompt": "cat", **FAST})
    assert body["error_code"] == 336004


@pytest.mark.parametrize(("field", "value"), [
    ("prompt", "x" * 1025), ("negative_prompt", "x" * 1025), ("size", "512x512"),
    ("size", "1000x1000"), ("n", 0), ("n", 5), ("steps", 9), ("steps", 51),
    ("sampler_index", "DDIM"), ("seed", -1), ("seed", 4294967296), ("cfg_scale", -0.1),
    ("cfg_scale", 30.5), ("style", "Watercolor"), ("n", "two"),
])
def test_out_of_range_fields_are_336003_naming_the_field(baidu, field, value):
    token = token_of(baidu)
    body = {"prompt": "cat", **FAST, field: value}
    got = sd_xl(baidu, token, body)
    assert set(got) == {"error_code", "error_msg"}
    assert got["error_code"] == 336003, got
    assert field in got["error_msg"]


def test_missing_prompt_bad_json_and_foreign_paths(baidu):
    token = token_of(baidu)
    missing = sd_xl(baidu, token, {"size": "768x768"})
    assert missing["error_code"] == 336003 and "prompt" in missing["error_msg"]
    assert sd_xl(baidu, token, b"{not json")["error_code"] == 336002
    nf = httpx.post(baidu.url + "/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/nope",
                    params={"access_token": token}, json={"prompt": "x"})
    assert nf.status_code == 200 and set(nf.json()) == {"error_code", "error_msg"}
    wrong_method = httpx.get(baidu.url + SD_XL_PATH, params={"access_token": token})
    assert wrong_method.status_code == 200 and set(wrong_method.json()) == {"error_code",
                                                                            "error_msg"}
    put_token = httpx.put(baidu.url + TOKEN_PATH)
    assert set(put_token.json()) == {"error_code", "error_msg"}


def test_styles_change_the_prompt_that_reaches_the_executor(baidu):
    token = token_of(baidu)
    engine = baidu.app.state.ctx.engine
    seen: list[str] = []
    original = engine.prepare

    def spy(request):
        prepared = original(request)
        seen.append(prepared.prompt)
        # Only the prompt matters here: shrink the work that reaches the executor (2 cores).
        return msgspec.structs.replace(prepared, width=64, height=64, steps=2)

    engine.prepare = spy
    try:
        for style in ("Base", "Anime", "Pixel Art"):
            got = sd_xl(baidu, token, {"prompt": "a lighthouse", "style": style, **FAST,
                                       "seed": 1, "n": 2})
            assert [d["index"] for d in got["data"]] == [1, 2]
    finally:
        engine.prepare = original
    assert len(set(seen)) == 3
    assert all("a lighthouse" in p for p in seen)
    with open("inference/styles.json", encoding="utf-8") as f:
        styles = json.load(f)
    assert seen[1] == styles["Anime"]["prompt"].replace("{prompt}", "a lighthouse")


def test_usage_formula_mixed_chinese_and_english():
    assert baidu_prompt_tokens("cat") == 1  # 1.3 → 1
    assert baidu_prompt_tokens("一只猫") == 3
    # 5 CJK characters + 5 English words × 1.3 = 11.5 → 12
    assert baidu_prompt_tokens("一只猫 sitting on a sofa", "白色 background") == 12
    assert baidu_prompt_tokens("red cat", "") == 3  # 2.6 → 3
    assert baidu_prompt_tokens("") == 0


def test_sd_xl_over_http_decodes_to_requested_size(baidu):
    token = token_of(baidu)
    started = time.perf_counter()
    got = sd_xl(baidu, token, {"prompt": "一只猫 and a dog", "negative_prompt": "白色", **FAST})
    took = time.perf_counter() - started
    assert got["object"] == "image" and isinstance(got["created"], int)
    assert [png_size(d["b64_image"]) for d in got["data"]] == [(768, 768)]
    assert got["data"][0]["object"] == "image"
    assert got["usage"] == {"prompt_tokens": 9, "total_tokens": 9}  # 5 CJK + 3 words × 1.3
    assert isinstance(got["data"][0]["seed"], int)  # the seed used is reported
    print(f"sd_xl 768x768 steps=10 took {took:.2f}s")


def test_whole_number_floats_and_reported_seeds(baidu):
    got = sd_xl(baidu, token_of(baidu), {"prompt": "cat", **FAST, "n": 2.0, "seed": 5.0})
    assert [d["seed"] for d in got["data"]] == [5, 6], got
