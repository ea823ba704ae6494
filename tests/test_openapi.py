"""The served OpenAPI document and docs page, and a small schemathesis run against them."""

from __future__ import annotations

import re

import httpx

from tests.fuzz import run_fuzz


def _registered(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every route handler of the app, every dialect included."""
    out = set()
    for route in app.routes:
        path = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*):[a-z]+\}", r"{\1}", route.path)
        for method in route.methods:
            if method != "OPTIONS":
                out.add((path, method.lower()))
    return out


def test_every_route_of_every_dialect_is_in_openapi_json(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    listed = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    registered = _registered(server.app)
    assert registered, "the app has no routes?"
    assert registered - listed == set()
    dialects = {op["tags"][0] for ops in doc["paths"].values() for op in ops.values()}
    assert {"openai", "baidu", "runpod", "core", "admin"} <= dialects


def test_annotated_routes_carry_their_structs(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    gen = doc["paths"]["/v1/images/generations"]["post"]
    body = gen["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schemas = doc["components"]["schemas"]
    req = schemas[body.rsplit("/", 1)[1]]
    assert req["properties"]["prompt"]["maxLength"] == 32000
    assert "prompt" in req["required"]
    ok = gen["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert "data" in schemas[ok.rsplit("/", 1)[1]]["properties"]
    err = gen["responses"]["default"]["content"]["application/json"]["schema"]["$ref"]
    assert schemas[err.rsplit("/", 1)[1]]["required"] == ["error"]
    sd_xl = doc["paths"]["/rpc/2.0/ai_custom/v1/wenxinworkshop/text2image/sd_xl"]["post"]
    # Baidu answers errors with HTTP 200: its 200 body is a success or an error envelope.
    assert len(sd_xl["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]) == 2
    assert [p["name"] for p in sd_xl["parameters"]] == ["access_token"]


def test_docs_page_is_self_contained(server):
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/images/generations" in r.text and "sd_xl" in r.text
    assert "<script" not in r.text and "https://" not in r.text


def test_fuzzing_the_schema_finds_no_5xx_and_no_envelope_violation():
    res = run_fuzz(8, seed=20261126)
    report = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, report
    assert re.search(r"\d+ generated, \d+ passed", res.stdout), report
