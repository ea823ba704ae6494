"""Helpers the dialects share."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.sizes import parse_size


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
