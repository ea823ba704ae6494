"""Webhook delivery: POST a finished job's body to the URL its submitter gave.

Each delivery is its own asyncio task, so it never holds up job execution. A delivery that
does not get a 2xx answer is retried (RunPod: twice, 10 s apart). The SSRF rules of
:mod:`gateway.fetch` apply to webhook URLs, with their own operator allow-list.

This module only sends; :mod:`gateway.outbox` makes a delivery survive the process (a
``settle`` callback hears how each one ended; a delivery cut off by shutdown never calls it, so
it stays pending for the next server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.fetch import AddressRefused, FetchPolicy, FetchRefused, post_json

logger = logging.getLogger(__name__)


class WebhookSender:
    """Delivers webhook bodies in the background with retries."""

    def __init__(self, policy: FetchPolicy, *, retries: int = 2, retry_delay_s: float = 10.0) -> None:
        self.policy = policy
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, body: bytes) -> asyncio.Task[bool]:
        """Start delivering ``body`` to ``url``; the task's result says whether it arrived."""
        task = asyncio.create_task(self.deliver(url, body), name="imagegate-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def longest_s(self) -> float:
        """The longest one delivery's attempts can take (each at most the policy's timeout)."""
        return (self.retries + 1) * self.policy.timeout_s + self.retries * self.retry_delay_s

    def send_rendered(self, url: str, render: Callable[[], Awaitable[bytes | None]],
                      settle: Callable[[bool], Awaitable[Any]] | None = None
                      ) -> asyncio.Task[bool]:
        """Like :meth:`send`, with the body rendered first in the same task (off the caller).

        ``settle(arrived)`` is awaited once the delivery ends (a body rendered as ``None`` has
        not arrived); not when the task is cancelled, nor when rendering fails (a store or disk
        fault): that is logged and the delivery left unsettled, so the outbox sends it again
        once its claim runs out, as after a crash.
        """

        async def run() -> bool:
            try:
                body = await render()
            except Exception as exc:  # noqa: BLE001 - the outbox resumes it; never a lost task
                logger.warning("webhook %s: could not render its body (%s: %s); it is sent "
                               "again once its claim runs out", _safe(url), type(exc).__name__,
                               exc)
                return False
            arrived = body is not None and await self.deliver(url, body)
            if settle is not None:
                await settle(arrived)
            return arrived

        task = asyncio.create_task(run(), name="imagegate-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def deliver(self, url: str, body: bytes) -> bool:
        """Try once plus ``retries`` times; True once the receiver answered 2xx."""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_delay_s)
            try:
                status = await post_json(url, body, self.policy)
            except AddressRefused as exc:
                logger.warning("webhook %s refused: %s", _safe(url), exc)
                return False  # an SSRF refusal will not change on retry
            except FetchRefused as exc:
                logger.warning("webhook %s attempt %d: %s", _safe(url), attempt + 1, exc)
                continue
            except Exception:
                # A bug here must end as a failed attempt, not as a dead task that leaves the
                # delivery pending until the outbox abandons it.
                logger.exception("webhook %s attempt %d failed", _safe(url), attempt + 1)
                continue
            if 200 <= status < 300:
                return True
            logger.warning("webhook %s attempt %d: HTTP %d", _safe(url), attempt + 1, status)
        return False

    async def close(self) -> None:
        """Cancel deliveries still pending (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _safe(url: str) -> str:
    """``url`` without its query string (which may carry a secret), for logs."""
    return url.split("?", 1)[0]
