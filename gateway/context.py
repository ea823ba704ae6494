"""Everything a dialect needs at request time, built once per app and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Request

from auth.keys import ANONYMOUS, KeyStore, Principal
from gateway.errors import ApiError
from gateway.media import MediaStore
from gateway.settings import Settings
from inference import Engine
from observability.metrics import Metrics


@dataclass
class GatewayContext:
    """Shared services of one running app."""

    settings: Settings
    engine: Engine
    keys: KeyStore
    media: MediaStore
    metrics: Metrics

    def authenticate_key(self, presented: str | None, scope: str) -> Principal:
        """The principal for an API key, or a 401/403 :class:`ApiError`.

        With no keys configured the server is open (loopback only, unless --insecure-no-auth).
        """
        if not self.keys.enabled:
            return ANONYMOUS
        if not presented:
            raise ApiError("auth", "missing API key; send it as 'Authorization: Bearer <key>'")
        principal = self.keys.by_key(presented)
        if principal is None:
            raise ApiError("auth", "invalid API key", code="invalid_api_key")
        if not principal.allows(scope):
            raise ApiError("forbidden", f"this key may not use the {scope} API")
        return principal

    def public_base_url(self, request: Request) -> str:
        """The base URL clients reach us at: ``--public-url`` or the request's own."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header (or a bare key), if any."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return header.strip() or None
