"""Signed, self-contained OAuth access tokens.

A token is a JWT (HS256, via ``joserfc``) behind Baidu's ``24.`` prefix, carrying the client id
and an expiry. Any replica configured with the same signing secret can verify it without shared
state. The clock is injectable so tests can expire tokens without sleeping.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Literal

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

ACCESS_PREFIX = "24."
REFRESH_PREFIX = "25."


class TokenRejected(Exception):
    """A presented token is unusable; ``reason`` is ``invalid`` or ``expired``."""

    def __init__(self, reason: Literal["invalid", "expired"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenService:
    """Issues and verifies access tokens with one HMAC signing secret."""

    def __init__(self, secret: str, ttl_s: int = 2592000,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = OctKey.import_key(secret.encode("utf-8"))
        self.ttl_s = ttl_s
        self.clock = clock

    def issue(self, client_id: str, kind: Literal["access", "refresh"] = "access") -> str:
        """A new token for ``client_id`` expiring ``ttl_s`` from now."""
        now = int(self.clock())
        claims = {"sub": client_id, "iat": now, "exp": now + self.ttl_s, "typ": kind,
                  "jti": secrets.token_hex(8)}
        token = jwt.encode({"alg": "HS256"}, claims, self._key)
        return (ACCESS_PREFIX if kind == "access" else REFRESH_PREFIX) + token

    def verify(self, token: str | None) -> str:
        """The client id of a valid, unexpired access token; raises :class:`TokenRejected`."""
        if not token or not token.startswith(ACCESS_PREFIX):
            raise TokenRejected("invalid", "Access token invalid or no longer valid")
        try:
            decoded = jwt.decode(token[len(ACCESS_PREFIX):], self._key, algorithms=["HS256"])
        except (JoseError, ValueError):
            raise TokenRejected("invalid", "Access token invalid or no longer valid") from None
        claims = decoded.claims
        sub, exp = claims.get("sub"), claims.get("exp")
        if claims.get("typ") != "access" or not isinstance(sub, str) or not isinstance(exp, int):
            raise TokenRejected("invalid", "Access token invalid or no longer valid")
        if self.clock() >= exp:
            raise TokenRejected("expired", "Access token expired")
        return sub
