"""Decoding request bodies into msgspec Structs, with errors that name the field."""

from __future__ import annotations

import functools
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
        # A value inside a mapping is at `[...]` (msgspec does not say which key): name the
        # mapping.
        parts = [p.rstrip("]") for p in re.split(r"\.|\[", raw.replace("[...]", "")) if p]
        path = ".".join(parts) or None
    for pattern in (_UNKNOWN, _MISSING):
        m2 = pattern.search(text)
        if m2:
            name = m2.group("name")
            path = f"{path}.{name}" if path else name
    return text, path


# RFC 8259 lets a parser ignore one; Python's json (so every FastAPI server) does, and some
# Windows tools write it.
_BOM = b"\xef\xbb\xbf"


def decode_json(body: bytes, type_: type[T], *, lax: bool = False) -> T:
    """Decode ``body`` as ``type_``; raise a 400 :class:`ApiError` naming the bad field.

    Whole-number floats (``"n": 1.0``) are accepted where an integer is expected, as the JSON
    encoders of some clients write every number as a float; so is a leading byte-order mark.
    ``lax``: read the body as a pydantic-1 API (AUTOMATIC1111's FastAPI) does: a top-level
    ``null`` is the field's default (its fields are all optional there), and numbers and
    booleans may come as strings (``"steps": "20"``).
    """
    body = body.removeprefix(_BOM)
    if not body.strip():
        raise invalid("request body is empty; expected a JSON object")
    try:
        if lax:
            data = msgspec.json.decode(body)
            if isinstance(data, dict):
                data = {k: v for k, v in data.items() if v is not None}
                data = _pydantic_bools(data, type_)
            return msgspec.convert(data, type_, strict=False)  # whole floats included
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.ValidationError as exc:
            text = str(exc)
            if not ("Expected `int" in text and "got `float`" in text):
                raise
            # Only on this error path: decode untyped, turn whole floats into ints, convert.
            return msgspec.convert(_whole_floats_to_int(msgspec.json.decode(body)), type_)
    except msgspec.ValidationError as exc:
        text, path = field_of(exc)
        msg = f"invalid value for '{path}': {text}" if path else text
        raise invalid(msg, field=path) from None
    except msgspec.DecodeError as exc:
        raise ApiError("validation", f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 only inside strings it keeps, and lets the codec error escape.
        raise ApiError("validation", f"request body is not valid UTF-8 (byte {exc.start})",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError("validation", "request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None


# The strings pydantic reads as booleans (msgspec's lax mode knows only true/false/0/1).
_PYDANTIC_BOOLS = {**dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
                   **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False)}


@functools.cache
def _bool_fields(type_: type) -> tuple[str, ...]:
    """The wire names of ``type_``'s boolean fields (none if it is not a Struct)."""
    try:
        fields = msgspec.structs.fields(type_)
    except TypeError:
        return ()
    return tuple(f.encode_name for f in fields if f.type in (bool, bool | None))


def _pydantic_bools(data: dict[str, Any], type_: type) -> dict[str, Any]:
    """``data`` with the strings pydantic takes for a boolean made booleans, in bool fields."""
    out = data
    for name in _bool_fields(type_):
        value = data.get(name)
        if isinstance(value, str) and value.strip().lower() in _PYDANTIC_BOOLS:
            out = out if out is not data else dict(data)
            out[name] = _PYDANTIC_BOOLS[value.strip().lower()]
    return out


def _whole_floats_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_to_int(v) for v in value]
    return value


def convert(data: object, type_: type[T]) -> T:
    """Like :func:`decode_json` for already-parsed data (form fields, query strings)."""
    try:
        return msgspec.convert(data, type_, strict=False)
    except RecursionError:
        raise invalid("value is nested too deeply") from None
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
