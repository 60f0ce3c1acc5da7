"""Heartbeats: each node publishes its load; ``FleetView`` keeps the fleet's latest picture.

Example::

    beats = Heartbeater(link, subjects.node_load("edge-1"), make_beat)
    await beats.start()
    fleet = FleetView(nc)
    await fleet.start()
    workers = fleet.healthy_workers("HuggingFaceTB/SmolLM2-135M-Instruct")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh import subjects
from mesh.bad_messages import note_bad_message
from mesh.connection import MeshLink
from mesh.errors import ProtocolError
from mesh.protocol import NodeHeartbeat

logger = logging.getLogger(__name__)

NcSource = MeshLink | Client | Callable[[], Client | None]


def _current_nc(source: NcSource) -> Client | None:
    if isinstance(source, MeshLink):
        return source.nc
    if isinstance(source, Client):
        return source
    return source()


class Heartbeater:
    """Publish ``make_beat()`` every ``interval_s``; never fails when NATS is away."""

    def __init__(
        self,
        link_or_nc_getter: NcSource,
        subject: str,
        make_beat: Callable[[], NodeHeartbeat],
        interval_s: float = 1.0,
    ) -> None:
        self._source = link_or_nc_getter
        self._subject = subject
        self._make_beat = make_beat
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.skipped = 0

    @property
    def running(self) -> bool:
        """Whether the heartbeat loop is running."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start beating in a background task (the first beat goes out at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"heartbeat {self._subject}")

    async def stop(self) -> None:
        """Stop beating."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def beat(self) -> bool:
        """Publish one heartbeat now; return whether it went out."""
        nc = _current_nc(self._source)
        # While nats-py reconnects it would buffer beats and flush them late, as if fresh.
        if nc is None or not nc.is_connected:
            return self._skip("not connected")
        try:
            data = self._make_beat().to_bytes()
        except Exception:
            logger.exception("building the heartbeat for %s failed", self._subject)
            return self._skip("no beat")
        try:
            await nc.publish(self._subject, data)
        except (nats.errors.Error, OSError) as exc:
            return self._skip(repr(exc))
        self.sent += 1
        return True

    def _skip(self, why: str) -> bool:
        logger.debug("heartbeat on %s skipped: %s", self._subject, why)
        self.skipped += 1
        return False

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self._interval_s)


_HEALTHY_TTL_S = 0.05


class FleetView:
    """The latest heartbeat of every node, from ``subjects.all_node_loads()``."""

    def __init__(
        self,
        nc: Client,
        *,
        clock: Callable[[], float] = time.monotonic,
        forget_after_s: float = 60.0,
    ) -> None:
        self._nc = nc
        self._clock = clock
        self._forget_after_s = forget_after_s
        # Freshness is judged by when a beat arrived here, not its sent_at: clocks differ.
        self._latest: dict[str, tuple[float, NodeHeartbeat]] = {}
        self._sub: Subscription | None = None
        # The edge asks for the healthy workers several times per request, and a fleet
        # of hundreds beats hundreds of times a second: the sorted answer is kept for
        # _HEALTHY_TTL_S, and dropped at once when a node joins, leaves or drains.
        # (model, max age) -> (when, healthy workers least loaded first, their ids)
        self._healthy: dict[
            tuple[str, float], tuple[float, list[NodeHeartbeat], frozenset[str]]
        ] = {}
        self._next_forget_at = 0.0

    async def start(self) -> None:
        """Subscribe to every node's heartbeats."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(subjects.all_node_loads(), cb=self._handle_beat)

    async def stop(self) -> None:
        """Unsubscribe (the last picture stays readable)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def nodes(self, max_age_s: float = 5.0) -> list[NodeHeartbeat]:
        """Nodes heard from within ``max_age_s``, ordered by node id."""
        cutoff = self._clock() - max_age_s
        fresh = [beat for at, beat in self._latest.values() if at >= cutoff]
        return sorted(fresh, key=lambda beat: beat.node_id)

    def quiet_s(self, role: str = "cloud") -> float:
        """Seconds since a beat of any ``role`` node arrived here (inf: none ever did)."""
        heard = [at for at, beat in self._latest.values() if beat.role == role]
        return self._clock() - max(heard) if heard else float("inf")

    def healthy_workers(self, model: str, max_age_s: float = 5.0) -> list[NodeHeartbeat]:
        """Fresh, non-draining cloud nodes serving ``model`` to edges, least loaded first.

        The answer may be up to ``_HEALTHY_TTL_S`` old in its load figures, never in
        which nodes it lists. Do not change the list returned: it is shared.
        """
        return self._healthy_now(model, max_age_s)[1]

    def is_healthy_worker(self, model: str, node_id: str, max_age_s: float = 5.0) -> bool:
        """Whether ``node_id`` is among ``healthy_workers(model)``: a set lookup, not a scan
        (the edge asks on every request with session affinity)."""
        return node_id in self._healthy_now(model, max_age_s)[2]

    def _healthy_now(
        self, model: str, max_age_s: float
    ) -> tuple[float, list[NodeHeartbeat], frozenset[str]]:
        now = self._clock()
        key = (model, max_age_s)
        cached = self._healthy.get(key)
        if cached is not None and now - cached[0] < _HEALTHY_TTL_S:
            return cached
        workers = [
            beat
            for beat in self.nodes(max_age_s)
            if beat.role == "cloud"
            and beat.model == model
            and not beat.load.draining
            and beat.worker_role != "prefill"  # prefill workers serve decode workers only
        ]
        workers.sort(key=lambda b: (b.load.waiting, b.load.running, b.node_id))
        entry = (now, workers, frozenset(b.node_id for b in workers))
        self._healthy[key] = entry
        return entry

    async def _handle_beat(self, msg: Msg) -> None:
        try:
            beat = NodeHeartbeat.from_bytes(msg.data)
        except ProtocolError as exc:
            note_bad_message("NodeHeartbeat", msg.subject, exc, logger)
            return
        if msg.subject != subjects.node_load(beat.node_id):
            logger.warning("ignoring %s's heartbeat sent on %s", beat.node_id, msg.subject)
            return
        now = self._clock()
        previous = self._latest.get(beat.node_id)
        self._latest[beat.node_id] = (now, beat)
        if (
            previous is None
            # It had gone quiet for longer than some cached answer allows: it is back.
            or now - previous[0] >= min((age for _, age in self._healthy), default=math.inf)
            or (previous[1].role, previous[1].model, previous[1].load.draining)
            != (beat.role, beat.model, beat.load.draining)
        ):
            self._healthy.clear()
        if now >= self._next_forget_at:  # a scan of the fleet, once a second at most
            self._next_forget_at = now + 1.0
            self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        cutoff = now - self._forget_after_s
        for node_id in [n for n, (at, _) in self._latest.items() if at < cutoff]:
            del self._latest[node_id]
            self._healthy.clear()
