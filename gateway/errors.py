"""Every failure, whatever raised it, becomes one :class:`Failure`; each dialect renders it.

Dialect handlers raise :class:`ApiError` (or let engine/framework errors through). The app-wide
exception handler normalises them here, then asks the dialect that owns the path for its
envelope. No framework default body and no traceback can reach a client.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from typing import Literal

import msgspec
import redis
from limits.errors import StorageError
from litestar.exceptions import HTTPException

from inference import errors as ie

logger = logging.getLogger(__name__)

Cause = Literal[
    "validation", "auth", "forbidden", "not_found", "method", "too_large", "overload", "quota",
    "timeout", "cancelled", "oom", "not_ready", "shutdown", "unavailable", "internal",
]

STATUS_BY_CAUSE: dict[str, int] = {
    "validation": 400, "auth": 401, "forbidden": 403, "not_found": 404, "method": 405,
    "too_large": 413, "overload": 429, "quota": 429, "timeout": 504, "cancelled": 499,
    "oom": 503, "not_ready": 503, "shutdown": 503, "unavailable": 503, "internal": 500,
}

STORE_RETRY_AFTER_S = 5.0
# SQLite's words for a store that is there but cannot be used right now; any other
# OperationalError (a missing table or column) is a bug and stays a logged 500.
_SQLITE_OUTAGES = ("database is locked", "database or disk is full", "disk i/o error",
                   "unable to open database file")
# Files the stores and the media store write (result images, URL-mode images): a full disk, a
# spent quota or a failing volume. Other OSErrors (a missing folder, permissions) are set-up
# mistakes and stay logged 500s.
_DISK_OUTAGES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def is_store_outage(exc: BaseException) -> bool:
    """The task store, quota counters or usage ledger cannot be reached right now.

    Redis down or paused, SQLite locked, a full or failing disk: a 503 to retry rather than a
    500, and what the job runner waits out.
    """
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                  | StorageError):
        return True
    if isinstance(exc, OSError) and exc.errno in _DISK_OUTAGES:
        return True
    return isinstance(exc, sqlite3.OperationalError) and any(
        words in str(exc).lower() for words in _SQLITE_OUTAGES)


class Failure(msgspec.Struct, kw_only=True):
    """A dialect-neutral description of what went wrong.

    ``field`` is the name of the offending wire field in the dialect's own terms, when known.
    ``code`` is an optional machine-readable detail (e.g. ``daily`` vs ``rps`` for quotas).
    """

    cause: Cause
    message: str
    status: int
    field: str | None = None
    code: str | None = None
    retry_after: float | None = None
    # False tells SDKs that retry 5xx (OpenAI's) not to: the same request would fail again.
    retryable: bool | None = None


class ApiError(Exception):
    """Raised by dialect code; carries a :class:`Failure`."""

    def __init__(
        self,
        cause: Cause,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = Failure(
            cause=cause, message=message, status=status or STATUS_BY_CAUSE[cause], field=field,
            code=code, retry_after=retry_after,
        )


def invalid(message: str, field: str | None = None) -> ApiError:
    """A 400 naming ``field``."""
    return ApiError("validation", message, field=field)


def failure_from(exc: BaseException, field_names: dict[str, str] | None = None) -> Failure:
    """Normalise any exception into a :class:`Failure`.

    ``field_names`` maps canonical request fields (``steps``) to the dialect's (``num_inference_steps``).
    """
    names = field_names or {}
    if isinstance(exc, ApiError):
        return exc.failure
    if isinstance(exc, ie.InvalidRequest):
        field = names.get(exc.field or "", exc.field)
        return Failure(cause="validation", message=_rename(exc.message, exc.field, field),
                       status=400, field=field)
    if isinstance(exc, ie.QueueFull):
        return Failure(cause="overload", message=exc.message, status=429, retry_after=exc.retry_after)
    if isinstance(exc, ie.ShuttingDown):
        return Failure(cause="shutdown", message=exc.message, status=503, retry_after=exc.retry_after)
    if isinstance(exc, ie.NotReady):
        return Failure(cause="not_ready", message=exc.message, status=503, retry_after=exc.retry_after)
    if isinstance(exc, ie.DeadlineExceeded):
        return Failure(cause="timeout", message=exc.message, status=504)
    if isinstance(exc, ie.OutOfMemory):
        return Failure(cause="oom", message=exc.message, status=503, retryable=False)
    if isinstance(exc, ie.Cancelled):
        return Failure(cause="cancelled", message=exc.message, status=499)
    if isinstance(exc, ie.InferenceError):
        return Failure(cause="internal", message=exc.message, status=500)
    if isinstance(exc, HTTPException):
        return _from_http(exc)
    if is_store_outage(exc):
        logger.warning("storage unavailable: %s: %s", type(exc).__name__, exc)
        return Failure(cause="unavailable", status=503, retry_after=STORE_RETRY_AFTER_S,
                       message="the server's storage is unavailable; retry shortly")
    logger.error("unhandled error", exc_info=exc)
    return Failure(cause="internal", message="internal server error", status=500)


def _rename(message: str, canonical: str | None, wire: str | None) -> str:
    if canonical and wire and canonical != wire and message.startswith(canonical):
        return wire + message[len(canonical):]
    return message


def _from_http(exc: HTTPException) -> Failure:
    status = exc.status_code
    if status == 404:
        return Failure(cause="not_found", message="no such route", status=404)
    if status == 405:
        return Failure(cause="method", message="method not allowed on this route", status=405)
    if status == 413:
        return Failure(cause="too_large", message="request body is too large", status=413)
    if status == 401:
        return Failure(cause="auth", message=str(exc.detail), status=401)
    if status == 400:
        # Litestar's own body/params errors: report the detail, never its extra payload.
        return Failure(cause="validation", message=str(exc.detail), status=400)
    if status < 500:
        return Failure(cause="validation", message=str(exc.detail), status=status)
    return Failure(cause="internal", message="internal server error", status=500)
