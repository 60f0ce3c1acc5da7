"""Heartbeats over a real nats-server: seen, expired, and surviving a server outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from nats.aio.client import Client

from mesh import bad_messages, subjects
from mesh.connection import connect, connect_in_background
from mesh.heartbeat import FleetView, Heartbeater
from mesh.protocol import NodeHeartbeat, NodeLoad
from mesh.server import EmbeddedNats, free_port
from tests.mesh.helpers import eventually

pytestmark = pytest.mark.timeout(60)

# A model name of this module alone: real workers on the shared server never match it.
MODEL = "tests.mesh/heartbeat-model"


def beat_of(
    node_id: str, role: Literal["edge", "cloud"] = "cloud", model: str = MODEL, waiting: int = 0
) -> Callable[[], NodeHeartbeat]:
    """A heartbeat factory for one node."""

    def make() -> NodeHeartbeat:
        load = NodeLoad(running=1, waiting=waiting, kv_cache_usage=0.1, tokens_per_s=50.0)
        return NodeHeartbeat(node_id=node_id, role=role, model=model, version="0", load=load)

    return make


def ids(beats: list[NodeHeartbeat]) -> list[str]:
    """The node ids of some heartbeats."""
    return [b.node_id for b in beats]


async def test_fleet_sees_beats_and_forgets_stale_ones(nc: Client) -> None:
    fleet = FleetView(nc)
    await fleet.start()
    busy = Heartbeater(nc, subjects.node_load("cloud.busy"), beat_of("cloud.busy", waiting=5), 0.05)
    idle = Heartbeater(nc, subjects.node_load("cloud-idle"), beat_of("cloud-idle"), 0.05)
    edge = Heartbeater(nc, subjects.node_load("edge-1"), beat_of("edge-1", role="edge"), 0.05)
    for beats in (busy, idle, edge):
        await beats.start()
    try:
        await eventually(lambda: len(fleet.nodes()) >= 3)
        assert {"cloud.busy", "cloud-idle", "edge-1"} <= set(ids(fleet.nodes()))
        assert ids(fleet.healthy_workers(MODEL)) == ["cloud-idle", "cloud.busy"]
        assert fleet.healthy_workers("another-model") == []
        assert fleet.is_healthy_worker(MODEL, "cloud.busy")
        assert not fleet.is_healthy_worker(MODEL, "edge-1")  # an edge is no worker
        assert not fleet.is_healthy_worker("another-model", "cloud.busy")
        await busy.stop()
        await asyncio.sleep(0.5)
        assert "cloud.busy" not in ids(fleet.nodes(max_age_s=0.3))
        assert "cloud.busy" in ids(fleet.nodes(max_age_s=60))
        assert ids(fleet.healthy_workers(MODEL, max_age_s=0.3)) == ["cloud-idle"]
        assert not fleet.is_healthy_worker(MODEL, "cloud.busy", max_age_s=0.3)
        assert fleet.is_healthy_worker(MODEL, "cloud-idle", max_age_s=0.3)
    finally:
        for beats in (busy, idle, edge):
            await beats.stop()
        await fleet.stop()
    assert busy.sent > 0


async def test_the_healthy_list_follows_joins_and_drains_at_once(nc: Client) -> None:
    """The sorted answer is cached, but never across a node joining or draining."""
    fleet = FleetView(nc)
    await fleet.start()
    draining = False

    def make() -> NodeHeartbeat:
        beat = beat_of("cloud-a")()
        return beat.model_copy(update={"load": beat.load.model_copy(update={"draining": draining})})

    first = Heartbeater(nc, subjects.node_load("cloud-a"), make, 60)
    second = Heartbeater(nc, subjects.node_load("cloud-b"), beat_of("cloud-b"), 60)
    try:
        assert fleet.healthy_workers(MODEL) == []
        await first.beat()
        await eventually(lambda: "cloud-a" in ids(fleet.nodes()))
        assert ids(fleet.healthy_workers(MODEL)) == ["cloud-a"]
        await second.beat()
        await eventually(lambda: "cloud-b" in ids(fleet.nodes()))
        assert ids(fleet.healthy_workers(MODEL)) == ["cloud-a", "cloud-b"]
        draining = True
        await first.beat()
        await eventually(lambda: any(b.load.draining for b in fleet.nodes()))
        assert ids(fleet.healthy_workers(MODEL)) == ["cloud-b"]
    finally:
        await fleet.stop()


async def test_fleet_ignores_garbage_and_misaddressed_beats(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.heartbeat")
    garbage_before = bad_messages.RECEIVED.counts["NodeHeartbeat"]
    fleet = FleetView(nc)
    await fleet.start()
    try:
        await nc.publish(subjects.node_load("junk"), b"{not json")
        spoof = beat_of("victim")().to_bytes()
        await nc.publish(subjects.node_load("liar"), spoof)
        await nc.publish(subjects.node_load("honest"), beat_of("honest")().to_bytes())
        await eventually(lambda: "honest" in ids(fleet.nodes()))
    finally:
        await fleet.stop()
    assert not {"junk", "victim", "liar"} & set(ids(fleet.nodes()))
    # Counted (and logged once a minute per kind, process-wide: see mesh.bad_messages).
    assert bad_messages.RECEIVED.counts["NodeHeartbeat"] == garbage_before + 1
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "victim" in warnings


async def test_heartbeater_survives_a_server_outage(tmp_path: Path) -> None:
    server = EmbeddedNats(port=free_port(), store_dir=tmp_path / "store")
    server.start()
    link = await connect_in_background(server.url, name="beating-node")
    beats = Heartbeater(link, subjects.node_load("cloud-9"), beat_of("cloud-9"), 0.05)
    watcher = await connect(server.url, name="watcher")
    fleet = FleetView(watcher)
    try:
        await link.wait_connected(timeout_s=10)
        await fleet.start()
        await beats.start()
        await eventually(lambda: "cloud-9" in ids(fleet.nodes(max_age_s=0.5)))

        await asyncio.to_thread(server.stop)
        skipped = beats.skipped
        await eventually(lambda: beats.skipped > skipped + 3)
        assert beats.running
        assert "cloud-9" not in ids(fleet.nodes(max_age_s=0.2))

        await asyncio.to_thread(server.restart)
        sent = beats.sent
        await eventually(lambda: beats.sent > sent + 3, timeout_s=15)
        await eventually(lambda: "cloud-9" in ids(fleet.nodes(max_age_s=0.2)), timeout_s=15)
    finally:
        await beats.stop()
        await fleet.stop()
        await watcher.close()
        await link.close()
        server.stop()
    assert not beats.running


async def test_heartbeater_without_a_connection_skips_quietly() -> None:
    beats = Heartbeater(lambda: None, subjects.node_load("offline"), beat_of("offline"), 0.01)
    assert await beats.beat() is False
    await beats.start()
    await eventually(lambda: beats.skipped >= 3)
    assert beats.running
    await beats.stop()
    assert beats.sent == 0
