"""Looking at the fleet from outside: a one-shot snapshot of heartbeats and services."""

from __future__ import annotations

import asyncio

from mesh.connection import MeshCredentials, connect
from mesh.heartbeat import FleetView
from mesh.protocol import NodeHeartbeat


async def snapshot(
    url: str, *, listen_s: float = 1.5, credentials: MeshCredentials | None = None
) -> list[NodeHeartbeat]:
    """Every node heard from within ``listen_s`` (heartbeats come about once a second)."""
    nc = await connect(url, name="tandem-status", credentials=credentials)
    try:
        fleet = FleetView(nc)
        await fleet.start()
        await asyncio.sleep(listen_s)
        return fleet.nodes(max_age_s=listen_s + 1)
    finally:
        await nc.close()
