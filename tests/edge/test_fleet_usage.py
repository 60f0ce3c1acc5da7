"""Fleet-wide cloud tokens per tenant: edges' counters summed in a real NATS KV bucket."""

from __future__ import annotations

import asyncio

import nats

from edge.fleet_usage import FleetUsage, counter_key, hour_of
from mesh import subjects
from mesh.server import EmbeddedNats

NOW = 1_796_000_000.0  # a fixed clock: a test must not straddle the hour the counters reset


def clock() -> float:
    return NOW


async def test_edges_add_up_without_losing_or_doubling_a_token() -> None:
    with EmbeddedNats() as hub:
        ncs = [await nats.connect(hub.url) for _ in range(4)]
        try:
            await FleetUsage.create_bucket(ncs[0])
            edges = [FleetUsage(nc, clock=clock) for nc in ncs]
            for _ in range(10):  # every edge counts, then all sync at once: they race
                for i, edge in enumerate(edges):
                    edge.add("acme", 10 + i)
                    edge.add("zeta", 1)
                await asyncio.gather(*(edge.sync() for edge in edges))
            for edge in edges:
                await edge.sync()  # the last reads see every write
            assert {e.used("acme") for e in edges} == {10 * (10 + 11 + 12 + 13)}
            assert {e.used("zeta") for e in edges} == {40}
            assert sum(e.conflicts for e in edges) > 0  # the races happened, and were retried
            kv = await ncs[0].jetstream().key_value(subjects.USAGE_BUCKET)
            entry = await kv.get(counter_key("acme", hour_of(NOW)))
            assert int(entry.value or b"0") == 460
        finally:
            for nc in ncs:
                await nc.close()


async def test_counts_wait_while_the_bucket_is_missing_and_land_later() -> None:
    with EmbeddedNats() as hub:
        nc = await nats.connect(hub.url)
        try:
            edge = FleetUsage(nc, clock=clock)
            edge.add("acme", 7)
            await edge.sync()  # no bucket yet (no key was ever created): kept, not lost
            assert edge.used("acme") == 7
            await FleetUsage.create_bucket(nc)
            await edge.sync()
            other = FleetUsage(nc, clock=clock)
            other.used("acme")  # asks for the tenant at the next sync
            await other.sync()
            assert other.used("acme") == 7
        finally:
            await nc.close()
