"""Admin-only HTTP routes (answered in the OpenAI envelope, like every unowned path)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from auth.usage import UsageRow
from gateway.context import GatewayContext, bearer_token
from gateway.errors import ApiError, invalid
from gateway.wire import json_response


class UsageQuery(msgspec.Struct, kw_only=True):
    """``GET /admin/usage`` query parameters."""

    client: str | None = None
    since: str | None = None


class UsageList(msgspec.Struct, kw_only=True):
    """``GET /admin/usage``."""

    data: list[UsageRow]
    object: str = "list"


def admin_handlers(ctx: GatewayContext) -> list[Any]:
    """``GET /admin/usage[?client=ID&since=YYYY-MM-DD]`` for clients with the admin flag."""

    @get("/admin/usage", opt={"dialect": "admin", "query_in": UsageQuery,
                              "schema_out": UsageList,
                              "summary": "The usage ledger, per client and UTC day (admin keys)"})
    async def usage(request: Request) -> Response:
        """The usage ledger, per client and UTC day.

        Admin access is its own right: an admin key may read it whatever API scopes it has.
        """
        principal = ctx.authenticate_key(bearer_token(request), scope=None)
        if ctx.keys.enabled and not principal.admin:
            raise ApiError("forbidden", "only admin clients may read the usage ledger")
        if not ctx.keys.enabled and not ctx.settings.is_loopback():
            raise ApiError("forbidden", "the usage ledger needs an admin API key")
        client = request.query_params.get("client")
        since = request.query_params.get("since")
        try:
            rows = ctx.ledger.rows(client, since)
        except ValueError:
            raise invalid(f"since must be a date (YYYY-MM-DD), got {since!r}",
                          field="since") from None
        return json_response(UsageList(data=rows))

    return [usage]
