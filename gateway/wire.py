"""Decoding request bodies into msgspec Structs, with errors that name the field."""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec
from litestar import Response

from gateway.errors import ApiError, Failure, invalid

T = TypeVar("T")

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]+)`")


def field_of(error: msgspec.ValidationError) -> tuple[str, str | None]:
    """Split msgspec's message into (text, dotted field path)."""
    text = str(error)
    path: str | None = None
    m = _AT.search(text)
    if m:
        text = text[: m.start()]
        raw = m.group("path")
        parts = [p for p in re.split(r"\.|\[", raw) if p]
        path = ".".join(p.rstrip("]") for p in parts) or None
    for pattern in (_UNKNOWN, _MISSING):
        m2 = pattern.search(text)
        if m2:
            name = m2.group("name")
            path = f"{path}.{name}" if path else name
    return text, path


def decode_json(body: bytes, type_: type[T]) -> T:
    """Decode ``body`` as ``type_``; raise a 400 :class:`ApiError` naming the bad field."""
    if not body.strip():
        raise invalid("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        text, path = field_of(exc)
        msg = f"invalid value for '{path}': {text}" if path else text
        raise invalid(msg, field=path) from None
    except msgspec.DecodeError as exc:
        raise ApiError("validation", f"request body is not valid JSON: {exc}", code="invalid_json") from None


def convert(data: object, type_: type[T]) -> T:
    """Like :func:`decode_json` for already-parsed data (form fields, query strings)."""
    try:
        return msgspec.convert(data, type_, strict=False)
    except msgspec.ValidationError as exc:
        text, path = field_of(exc)
        msg = f"invalid value for '{path}': {text}" if path else text
        raise invalid(msg, field=path) from None


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` (a Struct or plain data) encoded once by msgspec, as ``application/json``."""
    return Response(content=msgspec.json.encode(body), status_code=status,
                    media_type="application/json", headers=headers)


def retry_headers(failure: Failure) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) when the failure says when to come back."""
    if failure.retry_after is None:
        return {}
    return {"retry-after": str(max(1, math.ceil(failure.retry_after)))}
