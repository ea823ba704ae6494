"""The OpenAPI 3.1 document (``/openapi.json``) and a self-contained docs page (``/docs``).

Built from the route handlers themselves: every registered path and method appears; each
handler's ``opt`` adds what is known about it (``summary``, ``dialect``, ``schema_in`` /
``media_in`` for the body, ``query_in`` for query parameters, ``schema_out`` / ``media_out`` for
the success body, ``error_schema`` for a route whose errors differ from its dialect's). Schemas come from the msgspec Structs by msgspec's JSON-schema generator, so
the document says exactly what the server decodes and encodes. Each dialect's error envelope is
declared too (``Dialect.error_schema``), at the status codes it uses.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar import Response, get

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
_PARAM = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<type>[a-z]+))?\}")
_PARAM_TYPES = {"str": "string", "int": "integer", "float": "number", "uuid": "string",
                "path": "string"}


class ErrorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How one dialect reports errors: its envelope and whether it uses HTTP 200 for them."""

    schema: Any
    in_200: bool = False


def build_document(handlers: Iterable[Any], errors: dict[str, ErrorSpec],
                   *, title: str = "imagegate", version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``handlers``; ``errors`` maps dialect name → envelope.

    Errors of routes outside any dialect with an envelope (``core``, ``admin``) use the
    ``"default"`` entry of ``errors`` when there is one.
    """
    handlers = list(handlers)
    types: list[Any] = []
    for h in handlers:
        opt = getattr(h, "opt", None) or {}
        for key in ("schema_in", "schema_out", "query_in", "error_schema"):
            if opt.get(key) is not None:
                types.append(opt[key])
    for spec in errors.values():
        types.append(spec.schema)
    unique = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(
        unique, ref_template="#/components/schemas/{name}")
    ref_of = dict(zip(unique, refs, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for h in handlers:
        opt = getattr(h, "opt", None) or {}
        dialect = opt.get("dialect", "core")
        for litestar_path in sorted(h.paths):
            path, params = _path_and_params(litestar_path)
            entry = paths.setdefault(path or "/", {})
            for method in sorted(h.http_methods):
                if method == "OPTIONS":
                    continue
                op = _operation(h, opt, dialect, params, ref_of, errors, components, method)
                base = op["operationId"]
                n = 1
                while op["operationId"] in used:
                    n += 1
                    op["operationId"] = f"{base}_{n}"
                used.add(op["operationId"])
                entry[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Every API dialect imagegate serves, from its route handlers."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path_and_params(path: str) -> tuple[str, list[dict[str, Any]]]:
    params = []
    for m in _PARAM.finditer(path):
        params.append({"name": m.group("name"), "in": "path", "required": True,
                       "schema": {"type": _PARAM_TYPES.get(m.group("type") or "str", "string")}})
    return _PARAM.sub(lambda m: "{" + m.group("name") + "}", path), params


def _operation(h: Any, opt: dict[str, Any], dialect: str, params: list[dict[str, Any]],
               ref_of: dict[Any, Any], errors: dict[str, ErrorSpec],
               components: dict[str, Any], method: str) -> dict[str, Any]:
    doc = (getattr(h.fn, "__doc__", None) or "").strip()
    summary = opt.get("summary") or (doc.splitlines()[0] if doc else h.handler_name)
    op: dict[str, Any] = {
        "operationId": f"{dialect}_{h.handler_name}_{method.lower()}",
        "summary": summary,
        "tags": [dialect],
    }
    parameters = list(params)
    query = opt.get("query_in")
    if query is not None:
        name = ref_of[query]["$ref"].rsplit("/", 1)[1]
        schema = components.get(name, {})
        required = set(schema.get("required", []))
        for field, prop in schema.get("properties", {}).items():
            parameters.append({"name": field, "in": "query", "required": field in required,
                               "schema": prop})
    if parameters:
        op["parameters"] = parameters
    if opt.get("schema_in") is not None and method not in ("GET", "HEAD"):
        media = opt.get("media_in", "application/json")
        op["requestBody"] = {"required": True,
                             "content": {media: {"schema": ref_of[opt["schema_in"]]}}}
    ok: dict[str, Any] = {"description": "success"}
    # Routes outside every dialect (core, admin) answer errors in the fallback's envelope.
    spec = errors.get(dialect) or (errors.get("default") if dialect in ("core", "admin") else None)
    if opt.get("schema_out") is not None:
        schema: dict[str, Any] = ref_of[opt["schema_out"]]
        if spec is not None and spec.in_200:
            schema = {"oneOf": [schema, ref_of[spec.schema]]}
        ok["content"] = {"application/json": {"schema": schema}}
    elif opt.get("media_out"):
        ok["content"] = {opt["media_out"]: {"schema": {"type": "string",
                                                       "format": "binary"}}}
    responses: dict[str, Any] = {"200": ok}
    if spec is not None:
        error = ref_of[spec.schema]
        if opt.get("error_schema") is not None:  # a route with its own error body (OAuth)
            error = {"oneOf": [ref_of[opt["error_schema"]], error]}
        responses["default"] = {"description": "error, in this API's envelope",
                                "content": {"application/json": {"schema": error}}}
    else:  # a dialect that does not describe its envelope yet: a JSON object, at least
        responses["default"] = {"description": "error, in this API's envelope",
                                "content": {"application/json": {"schema": {"type": "object"}}}}
    op["responses"] = responses
    if dialect in ("openai", "admin"):
        op["security"] = [{"bearer": []}, {}]
    return op


def openapi_handlers(handlers: list[Any], errors: dict[str, ErrorSpec]) -> list[Any]:
    """``GET /openapi.json`` and ``GET /docs`` for ``handlers`` (and themselves)."""
    from inference import __version__ as ver

    cache: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if "doc" not in cache:
            cache["doc"] = build_document([*handlers, openapi_json, docs], errors, version=ver)
        return cache["doc"]

    @get(OPENAPI_PATH, opt={"dialect": "core", "summary": "This OpenAPI 3.1 document"})
    async def openapi_json() -> Response:
        """The OpenAPI document."""
        if "json" not in cache:
            cache["json"] = msgspec.json.encode(document())
        return Response(content=cache["json"], media_type="application/json")

    @get(DOCS_PATH, opt={"dialect": "core", "media_out": "text/html",
                         "summary": "API documentation, rendered from the OpenAPI document"})
    async def docs() -> Response:
        """The docs page: plain HTML, no scripts, nothing fetched from elsewhere."""
        if "html" not in cache:
            cache["html"] = render_html(document()).encode()
        return Response(content=cache["html"], media_type="text/html")  # Litestar adds the charset

    return [openapi_json, docs]


def render_html(doc: dict[str, Any]) -> str:
    """A readable, self-contained page: each operation with its parameters and schemas."""
    esc = html.escape
    schemas = doc["components"]["schemas"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>imagegate API</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
        "padding:0 1rem}code,pre{background:#f4f4f4}pre{padding:.5rem;overflow:auto}"
        "h3{margin-bottom:.2rem}.m{font-weight:bold;text-transform:uppercase}</style>",
        "</head><body>",
        f"<h1>{esc(doc['info']['title'])} {esc(doc['info']['version'])}</h1>",
        f"<p>{esc(doc['info']['description'])} Machine-readable: "
        f"<a href='{OPENAPI_PATH}'>{OPENAPI_PATH}</a>.</p>",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            by_tag.setdefault(op["tags"][0], []).append((path, method, op))
    for tag in sorted(by_tag):
        parts.append(f"<h2>{esc(tag)}</h2>")
        for path, method, op in by_tag[tag]:
            parts.append(f"<h3><span class='m'>{esc(method)}</span> <code>{esc(path)}</code></h3>")
            parts.append(f"<p>{esc(op.get('summary', ''))}</p>")
            for p in op.get("parameters", []):
                parts.append(f"<div>{esc(p['in'])} parameter <code>{esc(p['name'])}</code>"
                             f"{' (required)' if p.get('required') else ''}</div>")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                parts.append(f"<div>request body ({esc(media)}):</div>"
                             f"<pre>{esc(_show(content['schema'], schemas))}</pre>")
            for status, resp in op["responses"].items():
                for media, content in resp.get("content", {}).items():
                    parts.append(f"<div>{esc(status)} ({esc(media)}):</div>"
                                 f"<pre>{esc(_show(content['schema'], schemas))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _show(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A schema with its top-level ``$ref`` resolved, as indented JSON."""
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[1]
        schema = {"title": name, **schemas.get(name, {})}
    return msgspec.json.format(msgspec.json.encode(schema), indent=2).decode()
