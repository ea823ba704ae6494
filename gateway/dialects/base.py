"""The contract between the app and one API dialect module."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from litestar import Request, Response

from gateway.context import GatewayContext
from gateway.errors import Failure


class Dialect(ABC):
    """One client-facing API: its routes and its error envelope.

    A new API is one new module in ``gateway/dialects/`` that defines ``DIALECT = <subclass>``.
    """

    #: Short name, used in metrics labels and client scopes.
    name: ClassVar[str]
    #: Path prefixes this dialect owns: errors under them (404/405 included) use its envelope.
    prefixes: ClassVar[tuple[str, ...]]
    #: Canonical request field → this dialect's wire field name, for error messages.
    field_names: ClassVar[dict[str, str]] = {}
    #: The msgspec Struct of this dialect's error body, for the OpenAPI document.
    error_schema: ClassVar[Any] = None
    #: True when errors come with HTTP 200 (Baidu), so success bodies may be errors too.
    errors_in_200: ClassVar[bool] = False

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def route_handlers(self) -> list[Any]:
        """Litestar route handlers for this dialect."""

    @abstractmethod
    def render_failure(self, failure: Failure, request: Request) -> Response:
        """Render ``failure`` in this dialect's error envelope."""

    def owns(self, path: str) -> int:
        """Length of the longest owned prefix matching ``path`` (0: not ours)."""
        return max((len(p) for p in self.prefixes if path.startswith(p)), default=0)
