"""Everything a dialect needs at request time, built once per app and passed explicitly."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from litestar import Request

from auth.keys import ANONYMOUS, KeyStore, Principal
from auth.quota import QuotaExceeded, QuotaLimiter
from auth.tokens import TokenRejected, TokenService
from auth.usage import UsageLedger
from gateway import access_log
from gateway.errors import ApiError
from gateway.fetch import AllowList, FetchPolicy
from gateway.media import MediaStore
from gateway.settings import Settings
from inference import Engine, GenerationRequest, GenerationResult
from observability.metrics import Metrics

if TYPE_CHECKING:
    from gateway.jobs import JobRunner

logger = logging.getLogger(__name__)


@dataclass
class GatewayContext:
    """Shared services of one running app."""

    settings: Settings
    engine: Engine
    keys: KeyStore
    media: MediaStore
    metrics: Metrics
    tokens: TokenService = field(default=None)  # type: ignore[assignment]
    quotas: QuotaLimiter = field(default=None)  # type: ignore[assignment]
    ledger: UsageLedger = field(default=None)  # type: ignore[assignment]
    # Async jobs (RunPod and other task APIs): the durable store and the runner.
    jobs: JobRunner = field(default=None)  # type: ignore[assignment]
    # Limits for fetching the images requests point at (built from the settings).
    fetch_policy: FetchPolicy = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        # One policy for every image a request points at (image_url, init_images, edits).
        self.fetch_policy = FetchPolicy(
            allow=AllowList.parse(s.fetch_allow), max_bytes=s.fetch_max_bytes,
            timeout_s=s.fetch_timeout_s, max_pixels=s.fetch_max_pixels,
        )
        if self.tokens is None:
            secret = self.settings.token_secret
            if not secret:
                secret = secrets.token_urlsafe(32)
                logger.warning("no --token-secret set: OAuth tokens are signed with a random "
                               "secret, so they will not survive a restart or work on replicas")
            self.tokens = TokenService(secret, self.settings.token_ttl_s)
        if self.quotas is None:
            self.quotas = QuotaLimiter(self.settings.ratelimit_storage)
        if self.ledger is None:
            self.ledger = UsageLedger(self.settings.usage_path)

    def authenticate_token(self, token: str | None, scope: str) -> Principal:
        """The principal for a signed OAuth access token.

        Raises ``ApiError("auth", code="invalid"|"expired")`` or a 403 for a client not scoped
        for ``scope``. With no keys configured the server is open and any token (or none) passes.
        """
        if not self.keys.enabled:
            return ANONYMOUS
        try:
            client_id = self.tokens.verify(token)
        except TokenRejected as exc:
            raise ApiError("auth", str(exc), code=exc.reason) from None
        principal = self.keys.by_id(client_id)
        if principal is None:  # revoked or deleted since the token was issued
            raise ApiError("auth", "Access token invalid or no longer valid", code="invalid")
        access_log.note_client(principal.id)
        if scope is not None and not principal.allows(scope):
            raise ApiError("forbidden", f"this client may not use the {scope} API")
        return principal

    def admit(self, principal: Principal) -> None:
        """Count a request against the principal's quotas before it is queued.

        Raises ``ApiError("quota", code="rps"|"daily")``; a no-op for unlimited principals.
        """
        try:
            self.quotas.admit(principal)
        except QuotaExceeded as exc:
            err = ApiError("quota", str(exc), code=exc.kind, retry_after=exc.retry_after)
            # Retrying today cannot help once the daily allowance is spent.
            err.failure.retryable = False if exc.kind == "daily" else None
            raise err from None

    def record_usage(self, principal: Principal, result: GenerationResult, images: int,
                     prompt_tokens: int | None = None) -> None:
        """Add a finished generation to the usage ledger (never fails the request).

        Also what the request's access-log line reports as its image count.
        """
        access_log.note_images(images)
        try:
            self.ledger.record(
                principal.id, images=images,
                prompt_tokens=result.prompt_tokens if prompt_tokens is None else prompt_tokens,
                executor_seconds=result.timings.inference,
            )
        except Exception:
            logger.exception("could not record usage for %s", principal.id)

    def record_job_usage(self, request: GenerationRequest, result: GenerationResult) -> None:
        """Ledger entry for a finished async job, charged to the client that submitted it."""
        principal = self.keys.by_id(request.client_id) if request.client_id else None
        self.record_usage(principal or ANONYMOUS, result, len(result.images))

    def authenticate_key(self, presented: str | None, scope: str | None) -> Principal:
        """The principal for an API key, or a 401/403 :class:`ApiError`.

        ``scope`` is the dialect the key must be scoped for (``None``: any valid key, whatever
        its scopes; admin routes check the admin right themselves). With no keys configured the
        server is open (loopback only, unless --insecure-no-auth).
        """
        if not self.keys.enabled:
            return ANONYMOUS
        if not presented:
            raise ApiError("auth", "missing API key; send it as 'Authorization: Bearer <key>'")
        principal = self.keys.by_key(presented)
        if principal is None:
            raise ApiError("auth", "invalid API key", code="invalid_api_key")
        access_log.note_client(principal.id)
        if scope is not None and not principal.allows(scope):
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
