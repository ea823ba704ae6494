"""Per-client quotas across dialects, the durable usage ledger, and the ``imagegate keys`` CLI."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from gateway.cli import main as cli
from gateway.dialects.baidu import SD_XL_PATH, TOKEN_PATH
from tests.serving import live_server

SECRET = "test-signing-secret-0123456789abcdef"
OPENAI_FAST = {"prompt": "a fox", "size": "64x64", "response_format": "b64_json",
               "num_inference_steps": 2}
BAIDU_FAST = {"prompt": "一只猫", "size": "768x768", "steps": 10}


def create_client(keys_file, capsys, *args: str) -> dict[str, str]:
    assert cli(["keys", "create", "--keys-file", str(keys_file), *args]) == 0
    out = capsys.readouterr().out
    return dict(re.findall(r"^(\w+):\s+(\S+)$", out, re.M))


def baidu_token(url: str, cid: str, secret: str) -> str:
    return httpx.get(url + TOKEN_PATH, params={"grant_type": "client_credentials",
                                               "client_id": cid,
                                               "client_secret": secret}).json()["access_token"]


def baidu_call(url: str, token: str) -> dict:
    resp = httpx.post(url + SD_XL_PATH, params={"access_token": token}, json=BAIDU_FAST,
                      timeout=120)
    assert resp.status_code == 200
    return resp.json()


def openai_call(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=OPENAI_FAST, timeout=120,
                      headers={"authorization": f"Bearer {key}"})


def test_limits_trip_in_each_dialects_envelope(tmp_path, capsys):
    keys_file = tmp_path / "keys.json"
    daily = create_client(keys_file, capsys, "--id", "daily", "--daily", "2")
    slow = create_client(keys_file, capsys, "--id", "slow", "--rps", "0.2")  # 1 per 5 s
    with live_server(tmp_path, keys_file=str(keys_file), token_secret=SECRET) as live:
        # Daily: one allowance shared by both dialects of a client.
        token = baidu_token(live.url, "daily", daily["client_secret"])
        assert openai_call(live.url, daily["api_key"]).status_code == 200
        assert openai_call(live.url, daily["api_key"]).status_code == 200
        refused = baidu_call(live.url, token)
        assert refused["error_code"] == 17
        assert refused["error_msg"].startswith("Open api daily request limit reached (")
        assert "2 requests per day" in refused["error_msg"]
        resp = openai_call(live.url, daily["api_key"])
        assert resp.status_code == 429
        assert "Open api" not in resp.json()["error"]["message"]  # Baidu's words stay Baidu's
        assert "2 requests per day" in resp.json()["error"]["message"]
        # Over quota, uploads are refused before they are decoded: 429, not a 400 about them.
        for route in ("edits", "variations"):
            upload = httpx.post(f"{live.url}/v1/images/{route}", timeout=60,
                                headers={"authorization": f"Bearer {daily['api_key']}"},
                                files={"image": ("x.png", b"not an image", "image/png")},
                                data={"prompt": "x"})
            assert upload.status_code == 429, (route, upload.text)
        assert resp.json()["error"]["code"] == "insufficient_quota"
        assert resp.json()["error"]["type"] == "insufficient_quota"
        assert resp.headers["x-should-retry"] == "false"
        # QPS: the second request inside the window trips, in either dialect.
        token = baidu_token(live.url, "slow", slow["client_secret"])
        assert openai_call(live.url, slow["api_key"]).status_code == 200
        assert baidu_call(live.url, token)["error_code"] == 18
        again = openai_call(live.url, slow["api_key"])
        assert again.status_code == 429
        assert again.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(again.headers["retry-after"]) >= 1


def test_ledger_survives_restart_and_admin_route(tmp_path, capsys):
    keys_file = tmp_path / "keys.json"
    user = create_client(keys_file, capsys, "--id", "user")
    admin = create_client(keys_file, capsys, "--id", "boss", "--admin")
    settings = {"keys_file": str(keys_file), "token_secret": SECRET}
    with live_server(tmp_path, **settings) as live:
        token = baidu_token(live.url, "user", user["client_secret"])
        assert "data" in baidu_call(live.url, token)
        assert openai_call(live.url, user["api_key"]).status_code == 200
        assert openai_call(live.url, user["api_key"]).status_code == 200
    with live_server(tmp_path, **settings) as live:
        # The same signing secret: a token from before the restart still verifies.
        bad = httpx.post(live.url + SD_XL_PATH, params={"access_token": token},
                         json={**BAIDU_FAST, "n": 9}).json()
        assert bad["error_code"] == 336003
        refused = httpx.get(live.url + "/admin/usage",
                            headers={"authorization": f"Bearer {user['api_key']}"})
        assert refused.status_code == 403 and "error" in refused.json()
        got = httpx.get(live.url + "/admin/usage", params={"client": "user"},
                        headers={"authorization": f"Bearer {admin['api_key']}"})
        assert got.status_code == 200, got.text
        rows = got.json()["data"]
    assert len(rows) == 1
    row = rows[0]
    assert row["client"] == "user" and row["requests"] == 3 and row["images"] == 3
    # Baidu's formula for 一只猫 (3), plus the OpenAI requests' own counts.
    assert row["prompt_tokens"] >= 3
    assert row["executor_seconds"] > 0
    assert cli(["usage", "--data-dir", str(tmp_path / "data"), "--client", "user"]) == 0
    out = capsys.readouterr().out
    assert "user" in out and " 3 " in out
    assert cli(["usage", "--data-dir", str(tmp_path / "data"), "--since", "2999-01-01"]) == 0
    assert "user" not in capsys.readouterr().out


def test_keys_cli_create_use_revoke_refused(tmp_path, capsys):
    keys_file = tmp_path / "keys.json"
    creds = create_client(keys_file, capsys, "--id", "temp", "--scopes", "openai,baidu")
    stored = keys_file.read_text()
    assert creds["api_key"] not in stored and creds["client_secret"] not in stored
    assert cli(["keys", "create", "--keys-file", str(keys_file), "--id", "temp"]) == 1
    capsys.readouterr()
    with live_server(tmp_path, keys_file=str(keys_file), token_secret=SECRET) as live:
        token = baidu_token(live.url, "temp", creds["client_secret"])
        assert openai.OpenAI(base_url=live.url + "/v1", api_key=creds["api_key"],
                             max_retries=0).models.list().data
        assert openai_call(live.url, creds["api_key"]).status_code == 200
        # Past authentication (a validation error, not 110): the token is accepted.
        bad = httpx.post(live.url + SD_XL_PATH, params={"access_token": token},
                         json={**BAIDU_FAST, "steps": 9}).json()
        assert bad["error_code"] == 336003
        assert cli(["keys", "list", "--keys-file", str(keys_file)]) == 0
        assert "active" in capsys.readouterr().out
        assert cli(["keys", "revoke", "temp", "--keys-file", str(keys_file)]) == 0
        # The running server re-reads the keys file: key, secret and issued tokens all die.
        assert openai_call(live.url, creds["api_key"]).status_code == 401
        assert httpx.post(live.url + SD_XL_PATH, params={"access_token": token},
                          json={**BAIDU_FAST, "steps": 9}).json()["error_code"] == 110
        denied = httpx.get(live.url + TOKEN_PATH, params={
            "grant_type": "client_credentials", "client_id": "temp",
            "client_secret": creds["client_secret"]}).json()
        assert denied["error"] == "invalid_client"
    assert cli(["keys", "list", "--keys-file", str(keys_file)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli(["keys", "revoke", "nobody", "--keys-file", str(keys_file)]) == 1


@pytest.mark.parametrize("rps", [0.5, 2.0])
def test_rps_item(rps):
    from auth.quota import rps_item

    item = rps_item(rps)
    assert item.amount / item.get_expiry() == pytest.approx(rps)


def test_ledger_row_is_written_before_the_response(tmp_path):
    """Issue 11.13: an answered request is already in the ledger file (a kill -9 loses none)."""
    import sqlite3

    with live_server(tmp_path, api_keys="k1") as live:
        path = live.settings.usage_path
        for n in range(1, 4):
            assert openai_call(live.url, "k1").status_code == 200
            # A separate connection, as after a crash: no flush, no shared memory.
            with sqlite3.connect(path) as db:
                got = db.execute("SELECT SUM(requests) FROM usage").fetchone()[0]
            assert got == n, f"after {n} answered requests the ledger file holds {got}"
