"""Style presets: prompt templates kept as data in ``styles.json``, applied before batching."""

from __future__ import annotations

import json
from importlib import resources

import msgspec

from inference.errors import UnknownStyle


class StyleTemplate(msgspec.Struct, frozen=True):
    """``prompt`` holds ``{prompt}``; ``negative`` is appended to the user's negative prompt."""

    prompt: str
    negative: str = ""


class StyleBook:
    """Named prompt templates; lookup is case-insensitive."""

    def __init__(self, styles: dict[str, StyleTemplate]) -> None:
        self._styles = styles
        self._folded = {name.casefold(): name for name in styles}

    @classmethod
    def builtin(cls) -> StyleBook:
        """The styles shipped in ``inference/styles.json``."""
        raw = json.loads(resources.files("inference").joinpath("styles.json").read_text("utf-8"))
        raw.pop("_comment", None)
        return cls({name: msgspec.convert(v, StyleTemplate) for name, v in raw.items()})

    def names(self) -> list[str]:
        """Every style name."""
        return list(self._styles)

    def apply(self, style: str | None, prompt: str, negative: str) -> tuple[str, str]:
        """The (prompt, negative prompt) that reach the model for ``style``."""
        if style is None:
            return prompt, negative
        name = self._folded.get(style.casefold())
        if name is None:
            raise UnknownStyle(style, self.names())
        template = self._styles[name]
        styled = template.prompt.replace("{prompt}", prompt)
        if template.negative:
            negative = f"{negative}, {template.negative}" if negative else template.negative
        return styled, negative
