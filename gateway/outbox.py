"""The webhook outbox: a finished job's webhook is delivered at least once, across restarts.

A delivery's state lives on its job in the task store (:func:`inference.tasks.apply_changes`:
the write that makes a job final makes its webhook pending). The server that finishes a job
claims the delivery in that same write and sends it at once (:mod:`gateway.async_tasks`), with
the sender's retries. What can still go wrong is the process: it stops while a delivery waits
for its next attempt, or crashes between the final write and the send. This module finds such
deliveries (pending, claimed by no live server: :func:`inference.tasks.webhook_claimable`)
when the server starts and then periodically, claims each with a compare-and-set (so of
several replicas sharing Redis only one sends it), and hands it to the job's dialect to render
and send again. It also records how each delivery ended (sent or failed), best effort: a lost
write leaves the delivery pending, and it is sent again once its claim runs out.

A delivery is claimed at most :data:`~inference.tasks.MAX_WEBHOOK_ROUNDS` times (a receiver
whose answers crash the server must not be hammered by every restart); deliveries of expired
jobs are never resumed (the jobs are deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from gateway.task_store_async import AsyncTaskStore
from gateway.webhooks import WebhookSender
from inference.tasks import MAX_WEBHOOK_ROUNDS, Job, webhook_claim

logger = logging.getLogger(__name__)

#: How long a claim keeps other servers off a delivery unless the sender needs longer
#: (:meth:`WebhookOutbox.cover`); past it, the delivery is taken to be lost and claimable.
DEFAULT_LEASE_S = 120.0
#: Added to the longest a sender's attempts can take: rendering a body (ModelsLab copies images
#: to /media), DNS, scheduling on a busy loop.
LEASE_SLACK_S = 60.0

SENT = "sent"
FAILED = "failed"
ABANDONED = "abandoned"


class WebhookHandler(Protocol):
    """What a dialect with webhooks provides to the outbox."""

    def send_webhook(self, job: Job) -> None:
        """Render and deliver ``job``'s webhook in the background (a delivery claimed here)."""
        ...


class WebhookOutbox:
    """Claims, resumes and settles the webhook deliveries of one server (``worker_id``)."""

    def __init__(self, db: AsyncTaskStore, worker_id: str,
                 handlers: Mapping[str, WebhookHandler], *, lease_s: float = DEFAULT_LEASE_S,
                 max_rounds: int = MAX_WEBHOOK_ROUNDS,
                 on_outcome: Callable[[Job, str], None] | None = None) -> None:
        self.db = db
        self.worker_id = worker_id
        # The runner's handler registry, read when deliveries are resumed (dialects register
        # after the runner is made).
        self.handlers = handlers
        self.lease_s = lease_s
        self.max_rounds = max_rounds
        # Called with each delivery's job and how it ended: SENT, FAILED or ABANDONED (metrics).
        self.on_outcome = on_outcome
        self._senders: list[WebhookSender] = []

    def cover(self, sender: WebhookSender) -> None:
        """Make claims outlast ``sender``'s longest delivery; stop it with the others at close."""
        self.lease_s = max(self.lease_s, sender.longest_s + LEASE_SLACK_S)
        self._senders.append(sender)

    async def stop_senders(self) -> None:
        """Cut off every delivery still in flight (shutdown, before the store closes).

        A delivery cut off records nothing, so it stays pending and the next server sends it.
        """
        for sender in self._senders:
            await sender.close()

    def claim(self) -> dict[str, Any]:
        """Changes that claim a job's delivery for this server, given with its final write."""
        return webhook_claim(self.worker_id, self.lease_s)

    async def resume(self, dead: Collection[str] = (), *, at_start: bool = False) -> int:
        """Claim the pending deliveries no live server is sending and send them; how many.

        ``dead``: workers known to be gone whatever their heartbeat says (at start, this
        server's own id: a fixed ``--replica-id`` finds its previous run's claims).
        """
        claimed, given_up = await self.db.claim_webhooks(
            self.worker_id, self.lease_s, dead, self.max_rounds, list(self.handlers))
        for job in given_up:
            logger.warning("webhook of job %s given up: its delivery was interrupted %d times "
                           "(server stops or lost claims)", job.id, job.webhook_rounds)
            self._count(job, ABANDONED)
        if claimed:
            logger.warning("resuming %d pending webhook deliveries%s", len(claimed),
                           " left by a stopped server" if at_start else
                           " whose sender stopped or lost its claim")
        for job in claimed:
            try:
                self.handlers[job.dialect].send_webhook(job)
            except Exception:
                logger.exception("could not resume the webhook of job %s", job.id)
        return len(claimed)

    async def settle(self, job: Job, sent: bool) -> None:
        """Record that this server's delivery of ``job`` (as claimed) ended; best effort."""
        self._count(job, SENT if sent else FAILED)
        try:
            await self.db.settle_webhook(job, self.worker_id, sent)
        except Exception as exc:  # noqa: BLE001 - the delivery stays pending: sent again later
            logger.warning("could not record the webhook delivery of job %s (%s: %s); it stays "
                           "pending and is sent again once its claim runs out", job.id,
                           type(exc).__name__, exc)

    def _count(self, job: Job, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(job, outcome)
            except Exception:
                logger.exception("webhook outcome hook failed")
