"""The policy an edge applies, kept current from the store without dropping requests.

Requests read ``LivePolicy.current`` once, when they are routed; applying a new
revision swaps that one reference, so a request in flight finishes under the
policy it started with and the next one sees the new one. A stored revision that
does not validate is never applied: the edge keeps the last good policy and
reports the refusal (``rejected``, /health, /metrics and the ``applied`` subject).

``PolicyFollower`` watches the KV key (new revisions arrive within milliseconds)
and also re-reads it every ``resync_s``; after a reconnect (a NATS restart) it
re-creates the watch, since a JetStream watch does not reliably survive one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client

from mesh import subjects
from mesh.protocol import PolicyApplied
from router.policy import RoutingPolicy
from router.store import PolicyStore, StoredPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    revision: int
    error: str


class LivePolicy:
    """The routing policy in force on this edge, and where it came from."""

    def __init__(self, initial: RoutingPolicy, source: str = "built-in") -> None:
        self.current = initial
        self.source = source  # built-in | file | store
        self.revision: int | None = None  # the store revision applied, if any
        self.applied_at = time.time()
        self.rejected: Rejection | None = None  # the latest refused revision
        self.rejections = 0

    def apply(self, stored: StoredPolicy) -> bool:
        """Switch to ``stored`` if it is valid and new; False if it was refused."""
        if self.revision is not None and stored.revision <= self.revision:
            return True  # already applied (watch and resync both deliver it)
        if stored.policy is None:
            if self.rejected is None or self.rejected.revision != stored.revision:
                self.rejections += 1
                logger.error(
                    "policy revision %d is invalid; keeping %s: %s",
                    stored.revision,
                    self.describe_source(),
                    stored.error,
                )
            self.rejected = Rejection(stored.revision, stored.error or "invalid")
            return False
        self.current = stored.policy
        self.source, self.revision = "store", stored.revision
        self.applied_at = time.time()
        logger.info("applied routing policy revision %d (%s)", stored.revision, stored.author)
        return True

    def describe_source(self) -> str:
        return (
            f"revision {self.revision}"
            if self.revision is not None
            else f"the {self.source} policy"
        )

    def status(self) -> dict[str, object]:
        """For /health: what is applied, and what was refused."""
        return {
            "source": self.source,
            "revision": self.revision,
            "applied_at": round(self.applied_at, 3),
            "rejected": None
            if self.rejected is None
            else {"revision": self.rejected.revision, "error": self.rejected.error},
        }


class PolicyFollower:
    """Keeps a ``LivePolicy`` on the stored revision and reports each one applied."""

    def __init__(
        self,
        nc: Client,
        live: LivePolicy,
        node_id: str,
        *,
        resync_s: float = 2.0,
    ) -> None:
        self._nc = nc
        self._live = live
        self._node_id = node_id
        self._resync_s = resync_s
        self._watcher: asyncio.Task[None]
        self._resyncer: asyncio.Task[None]
        self._reported: int | None = None

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="policy-watch")
        self._resyncer = asyncio.create_task(self._resync(), name="policy-resync")

    async def stop(self) -> None:
        for task in (self._watcher, self._resyncer):
            task.cancel()
        for task in (self._watcher, self._resyncer):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _take(self, stored: StoredPolicy) -> None:
        applied = self._live.apply(stored)
        if self._reported == stored.revision:
            return
        self._reported = stored.revision
        report = PolicyApplied(
            node_id=self._node_id,
            revision=stored.revision,
            applied=applied,
            error=None if applied else stored.error,
        )
        with contextlib.suppress(Exception):  # a report is best effort; the policy is applied
            await self._nc.publish(subjects.policy_applied(), report.to_bytes())

    async def _watch(self) -> None:
        while True:
            try:
                store = await PolicyStore.open(self._nc, create=False)  # operators create it
                async for stored in store.watch():
                    await self._take(stored)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or restarting: resync covers the gap
                logger.debug("policy watch interrupted (%s); re-watching", exc)
            await asyncio.sleep(1.0)

    async def _resync(self) -> None:
        reconnects = self._nc.stats["reconnects"]
        while True:
            await asyncio.sleep(self._resync_s)
            if self._nc.stats["reconnects"] != reconnects:
                reconnects = self._nc.stats["reconnects"]
                self._watcher.cancel()
                self._watcher = asyncio.create_task(self._watch(), name="policy-watch")
            try:
                store = await PolicyStore.open(self._nc, create=False)  # operators create it
                stored = await store.current()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("policy resync failed (%s)", exc)
                continue
            if stored is not None:
                await self._take(stored)
