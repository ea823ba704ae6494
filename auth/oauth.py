"""The OAuth 2 token endpoint (client-credentials grant), built from authlib's server pieces.

Baidu's flavour: ``/oauth/2.0/token`` answers GET and POST, with ``grant_type``, ``client_id`` and
``client_secret`` in the query string (a form body is accepted too). The framework glue here turns
a Litestar request into an authlib :class:`OAuth2Request` and returns ``(status, body, headers)``.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload

from auth.keys import Client, KeyStore, sha256_hex
from auth.tokens import TokenService

AUTH_METHOD = "client_secret_query"


class OAuthClient(ClientMixin):
    """Adapts a keys-file :class:`Client` to authlib's client interface."""

    def __init__(self, record: Client | None, client_id: str) -> None:
        self.record = record
        self.client_id = client_id

    def get_client_id(self) -> str:
        """The client id."""
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        """Not used by the client-credentials grant."""
        return None

    def get_allowed_scope(self, scope: str) -> str:
        """The client's scopes (the dialects it may call), whatever was asked."""
        scopes = self.record.scopes if self.record else ["*"]
        return " ".join(["public", *scopes])

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Not used by the client-credentials grant."""
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        """Compare the secret's hash in constant time (open servers: any secret)."""
        if self.record is None:
            return True
        stored = self.record.secret_sha256 or ""
        return bool(stored) and hmac.compare_digest(stored, sha256_hex(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        """Only credentials in the query string or form body."""
        return method == AUTH_METHOD

    def check_response_type(self, response_type: str) -> bool:
        """No authorization endpoint here."""
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        """Only client credentials."""
        return grant_type == "client_credentials"


class BaiduClientCredentialsGrant(ClientCredentialsGrant):
    """Client credentials over GET or POST, credentials in the query string or form body."""

    TOKEN_ENDPOINT_AUTH_METHODS = [AUTH_METHOD]  # noqa: RUF012 (authlib's own class attribute)
    TOKEN_ENDPOINT_HTTP_METHODS = ["GET", "POST"]  # noqa: RUF012


class TokenServer(AuthorizationServer):
    """authlib's authorization server, wired to the key store and the token signer."""

    def __init__(self, keys: KeyStore, tokens: TokenService) -> None:
        super().__init__()
        self.keys = keys
        self.tokens = tokens
        self.register_grant(BaiduClientCredentialsGrant)
        self.register_client_auth_method(AUTH_METHOD, _authenticate_from_payload)
        self.register_token_generator("default", self._generate)

    def query_client(self, client_id: str) -> OAuthClient | None:
        """The client with ``client_id``; on an open server (no keys) any id is a client."""
        if not self.keys.enabled:
            return OAuthClient(None, client_id)
        record = self.keys.client(client_id)
        return OAuthClient(record, client_id) if record else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Tokens are self-contained and signed: nothing to store."""

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system."""

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        """``request`` is ``(method, url, query_string, form_body)`` from the route handler."""
        if isinstance(request, OAuth2Request):
            return request
        method, url, query, form = request
        data = dict(parse_qsl(query, keep_blank_values=True))
        data.update(form)
        # Plain-HTTP deployments sit behind TLS-terminating proxies; authlib refuses http:// URIs
        # outright, so it is handed the https form of the same URL.
        req = _Request(method, "https://" + url.split("://", 1)[-1], data, dict(form))
        return req

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
        """Hand the triple back to the route handler, which renders it."""
        return status, body, headers

    def _generate(self, grant_type: str, client: OAuthClient, user: Any = None,
                  scope: str | None = None, expires_in: int | None = None,
                  include_refresh_token: bool = True) -> dict[str, Any]:
        cid = client.get_client_id()
        return {
            "refresh_token": self.tokens.issue(cid, "refresh"),
            "expires_in": self.tokens.ttl_s,
            "session_key": secrets.token_urlsafe(24),
            "access_token": self.tokens.issue(cid, "access"),
            "scope": client.get_allowed_scope(scope or ""),
            "session_secret": secrets.token_hex(16),
        }

    def token_response(self, method: str, url: str, query: str,
                       form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Run the token endpoint; returns (HTTP status, JSON body)."""
        status, body, _headers = self.create_token_response((method, url, query, form))
        return status, body


class _Request(OAuth2Request):
    def __init__(self, method: str, uri: str, data: dict[str, str], form: dict[str, str]) -> None:
        super().__init__(method, uri, headers={})
        self.payload = BasicOAuth2Payload(data)
        self._form = form

    @property
    def args(self) -> dict[str, str]:
        return self.payload.data

    @property
    def form(self) -> dict[str, str]:
        return self._form


def _authenticate_from_payload(query_client: Any, request: OAuth2Request) -> OAuthClient | None:
    """Credentials from the query string or form, with Baidu's two error descriptions."""
    data = request.payload.data
    client_id = data.get("client_id")
    secret = data.get("client_secret") or ""
    if not client_id:
        raise InvalidClientError(description="unknown client id")
    client = query_client(client_id)
    if client is None:
        raise InvalidClientError(description="unknown client id")
    if not client.check_client_secret(secret):
        raise InvalidClientError(description="Client authentication failed")
    return client
