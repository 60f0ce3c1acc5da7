"""The edge on the mesh: connect in the background and publish heartbeats.

The edge serves locally whatever NATS does: the link connects (and reconnects)
in the background, and a heartbeat that cannot be sent is skipped.
"""

from __future__ import annotations

import time

from nats.aio.client import Client

from edge.api_keys import ApiKeyFollower, KeyRing
from edge.cloud_route import CloudRoute
from edge.fleet_usage import FleetUsage
from edge.generation import EdgeEngine
from edge.settings import EdgeSettings
from mesh import subjects
from mesh.connection import MeshCredentials, MeshLink, connect_in_background
from mesh.heartbeat import FleetView, Heartbeater
from mesh.protocol import NodeHeartbeat, NodeLoad
from mesh.version import __version__
from router.live import LivePolicy, PolicyFollower


class _TokenRate:
    """Tokens per second over the interval between two reads."""

    def __init__(self, engine: EdgeEngine) -> None:
        self._engine = engine
        self._last = (time.monotonic(), engine.generated_tokens)

    def read(self) -> float:
        now, tokens = time.monotonic(), self._engine.generated_tokens
        then, before = self._last
        self._last = (now, tokens)
        return max(0.0, (tokens - before) / max(now - then, 1e-6))


class MeshRegistration:
    """Announces this edge on the mesh, watches the fleet, and owns the cloud route."""

    def __init__(
        self,
        settings: EdgeSettings,
        engine: EdgeEngine,
        policy: LivePolicy,
        keys: KeyRing | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._policy = policy
        self._follower: PolicyFollower | None = None
        self._keys = keys  # follow the mesh's API keys into this ring (mesh_api_keys)
        self._key_follower: ApiKeyFollower | None = None
        self.fleet_usage: FleetUsage | None = None  # the tenants' fleet-wide cloud tokens
        self._rate = _TokenRate(engine)
        self._link: MeshLink | None = None
        self._beats: Heartbeater | None = None
        self.fleet: FleetView | None = None
        self.cloud: CloudRoute | None = None  # set once the mesh is reachable

    @property
    def connected(self) -> bool:
        """Whether the NATS link is up right now."""
        return self._link is not None and self._link.connected

    def beat(self) -> NodeHeartbeat:
        """This edge's heartbeat now."""
        s, e = self._settings, self._engine
        return NodeHeartbeat(
            node_id=s.node_id,
            role="edge",
            model=s.model,
            version=__version__,
            endpoint=f"{'https' if s.tls_certfile else 'http'}://{s.host}:{s.port}",
            simulated=e.simulated,
            load=NodeLoad(
                running=e.running,
                waiting=e.waiting,
                kv_cache_usage=min(1.0, e.running / max(1, e.config.slots)),
                tokens_per_s=self._rate.read(),
            ),
        )

    async def start(self) -> None:
        """Connect in the background and start the heartbeat loop."""
        s = self._settings
        assert s.nats_url is not None
        self._link = await connect_in_background(
            s.nats_url,
            name=s.node_id,
            on_connect=self._on_connect,
            credentials=MeshCredentials(s.nats_creds, s.nats_tls_ca),
        )
        self._beats = Heartbeater(
            self._link,
            subjects.node_load(self._settings.node_id),
            self.beat,
            interval_s=self._settings.heartbeat_s,
        )
        await self._beats.start()

    async def _on_connect(self, nc: Client) -> None:
        assert self._link is not None
        self.fleet = FleetView(nc)
        await self.fleet.start()
        s = self._settings
        self.cloud = CloudRoute(
            self._link,
            self.fleet,
            s.model,
            stall_timeout_s=s.cloud_stall_timeout_s,
            emulated_rtt_s=s.emulated_rtt_ms / 1000,
        )
        if self._follower is None:  # it re-watches by itself after a reconnect
            self._follower = PolicyFollower(nc, self._policy, s.node_id)
            await self._follower.start()
        if self._keys is not None and self._key_follower is None:  # ... and so do these
            self._key_follower = ApiKeyFollower(nc, self._keys)
            await self._key_follower.start()
            self.fleet_usage = FleetUsage(nc)
            await self.fleet_usage.start()

    async def stop(self) -> None:
        """Stop beating and close the link."""
        if self._follower:
            await self._follower.stop()
        if self._key_follower:
            await self._key_follower.stop()
        if self.fleet_usage:
            await self.fleet_usage.stop()  # writes what it counted last
        if self._beats:
            await self._beats.stop()
        if self.fleet:
            await self.fleet.stop()
        if self._link:
            await self._link.close()
