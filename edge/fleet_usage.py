"""Each tenant's cloud tokens this hour, summed over every edge of the fleet.

An API key may give its tenant a cloud budget (``tandem keys create
--cloud-tokens-per-hour N``) that holds across the fleet, not per edge. Every edge
counts the cloud tokens its answers used, per tenant, and every ``sync_s`` adds
what it counted to one counter per tenant and UTC hour in a NATS KV bucket
(``tandem_usage``, key ``<tenant>.<YYYYMMDDHH>``) with a compare-and-set on the
counter's revision, re-reading and retrying when another edge wrote first: no
edge's tokens are lost or counted twice. The same read refreshes this edge's view
of the fleet total, so ``used(tenant)`` is the fleet's total at the last sync plus
what this edge counted since.

How far a tenant can overshoot its budget: a request is admitted to the cloud
while ``used < budget``, so the overshoot is what the fleet's in-flight cloud
answers add when the budget is crossed, plus what the *other* edges counted but
this edge has not seen yet: up to two sync intervals of theirs (one until they
write it, one until this edge reads it), so at most ``(edges - 1) x 2 x sync_s x``
the tenant's cloud tokens per second per edge. ``bench/budget_bench.py`` measures it.

The hour is a fixed UTC hour (the counter resets on the hour); the routing
policy's own per-edge budgets (``budgets:``) keep their sliding hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from mesh import subjects
from mesh.buckets import create_bucket

logger = logging.getLogger(__name__)

_SYNC_S = 1.0
_CAS_ATTEMPTS = 16
_TRACK_S = 600.0  # a tenant not seen for this long is no longer refreshed
_KEEP_S = 2 * 3600  # the bucket's TTL: last hour's counters stay readable a while


def hour_of(unix_s: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(unix_s))


def counter_key(tenant: str, hour: str) -> str:
    return f"{subjects.token(tenant)}.{hour}"


class FleetUsage:
    """This edge's view of each tenant's fleet-wide cloud tokens this hour."""

    def __init__(
        self, nc: Client, *, sync_s: float = _SYNC_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._nc = nc
        self._sync_s = sync_s
        self._clock = clock
        self._kv: KeyValue | None = None
        self._fleet: dict[str, int] = {}  # counter key -> fleet total at the last sync
        self._pending: dict[str, int] = defaultdict(int)  # counted here, not yet written
        self._seen: dict[str, float] = {}  # tenant -> when a request last asked
        self._task: asyncio.Task[None] | None = None
        self.conflicts = 0  # compare-and-set retries (another edge wrote first)
        self.synced = asyncio.Event()  # set after each completed sync (tests wait on it)

    @staticmethod
    async def create_bucket(nc: Client) -> None:
        """Make the bucket (operators: ``tandem keys create`` does it on first use)."""
        await create_bucket(
            nc.jetstream(),
            api.KeyValueConfig(
                bucket=subjects.USAGE_BUCKET,
                history=1,
                ttl=_KEEP_S,
                description="Tandem fleet-wide cloud tokens per tenant and UTC hour",
            ),
        )

    def used(self, tenant: str) -> int:
        """The tenant's cloud tokens this hour: the fleet at the last sync, plus ours since."""
        self._seen[tenant] = self._clock()
        key = counter_key(tenant, hour_of(self._clock()))
        return self._fleet.get(key, 0) + self._pending.get(key, 0)

    def add(self, tenant: str, tokens: int) -> None:
        """Count a finished cloud answer's tokens (written at the next sync)."""
        if tokens > 0:
            self._seen[tenant] = self._clock()
            self._pending[counter_key(tenant, hour_of(self._clock()))] += tokens

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet-usage-sync")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # a last write, so a clean stop loses nothing
            await asyncio.wait_for(self.sync(), timeout=2.0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away, or no bucket yet: the counts wait here
                logger.debug("fleet usage sync failed (%s); retrying", exc)

    async def sync(self) -> None:
        """Write what this edge counted and read the fleet totals of recent tenants."""
        if self._kv is None:
            try:
                self._kv = await self._nc.jetstream().key_value(subjects.USAGE_BUCKET)
            except NotFoundError:
                return  # no keys were ever created on this mesh: nothing to share yet
        now = self._clock()
        hour = hour_of(now)
        self._seen = {t: at for t, at in self._seen.items() if now - at < _TRACK_S}
        keys = set(self._pending) | {counter_key(t, hour) for t in self._seen}
        for key in keys:
            await self._sync_key(self._kv, key)
        self._fleet = {k: v for k, v in self._fleet.items() if k.endswith(hour) or k in keys}
        self.synced.set()

    async def _sync_key(self, kv: KeyValue, key: str) -> None:
        add = self._pending.pop(key, 0)
        try:
            for _ in range(_CAS_ATTEMPTS):
                try:
                    entry = await kv.get(key)
                    total, revision = int(entry.value or b"0"), entry.revision
                except KeyNotFoundError:
                    total, revision = 0, None
                if add == 0:
                    self._fleet[key] = total
                    return
                try:
                    value = str(total + add).encode()
                    if revision is None:
                        await kv.create(key, value)
                    else:
                        await kv.update(key, value, last=revision)
                except KeyWrongLastSequenceError:
                    self.conflicts += 1  # another edge wrote first: read again
                    continue
                self._fleet[key] = total + add
                add = 0
                return
            logger.warning("fleet usage %s: %d writers raced; retrying next sync", key, add)
        finally:
            if add:  # not written (conflicts, NATS away): keep it for the next sync
                self._pending[key] += add
