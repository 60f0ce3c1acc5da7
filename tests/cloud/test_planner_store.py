"""The planner's configuration and lease in a real nats-server's KV: compare-and-set,
an invalid revision never applied (the last good one stays), one planner per pool."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.client import Client

from cloud.planner import Planner
from cloud.planner_config import (
    LeaseHeldError,
    LeaseLostError,
    PlannerConfigConflictError,
    PlannerConfigError,
    PlannerStore,
)
from mesh.connection import connect
from mesh.server import EmbeddedNats
from models.latency import LatencyProfile

pytestmark = pytest.mark.timeout(30)


class NoWorkers:
    """A connector with no workers and no way to start any (the store tests need none)."""

    async def workers(self) -> list[str]:
        return []

    async def scale_up(self, count: int) -> list[str]:
        return []

    async def drain(self, worker_id: str) -> None:
        return None

    def removable(self, worker_ids: list[str]) -> list[str]:
        return []


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, name="planner-test")
    yield client
    await client.close()


def _pool() -> str:
    return f"pool-{uuid.uuid4().hex[:6]}"


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_config_writes_are_validated_and_compare_and_set(nc: Client) -> None:
    store, pool = await PlannerStore.open(nc), _pool()
    assert await store.config(pool) is None
    first = await store.set_config(pool, "bounds: {max_replicas: 4}\n", expect_revision=0)
    with pytest.raises(PlannerConfigConflictError):
        await store.set_config(pool, "bounds: {max_replicas: 5}\n", expect_revision=0)
    with pytest.raises(PlannerConfigError, match=r"bounds\.max_replicas"):
        await store.set_config(pool, "bounds: {max_replicas: 0}\n", expect_revision=first)
    second = await store.set_config(pool, "bounds: {max_replicas: 6}\n", expect_revision=first)
    stored = await store.config(pool)
    assert stored is not None and stored.revision == second
    assert stored.config is not None and stored.config.bounds.max_replicas == 6


async def test_a_planner_follows_valid_revisions_and_keeps_the_last_good_one(nc: Client) -> None:
    store, pool = await PlannerStore.open(nc), _pool()
    good = await store.set_config(pool, "bounds: {max_replicas: 3}\n", expect_revision=0)
    planner = Planner(nc, pool, NoWorkers(), profile=LatencyProfile.default().cloud)
    await planner.start()
    try:
        assert planner.config_revision == good and planner.config.bounds.max_replicas == 3
        # Written by hand, past the store's validation: a planner must refuse it.
        bad = await store._put_raw(
            pool, b'{"yaml": "bounds: {max_replicas: -2}"}', expect_revision=good
        )
        await _until(lambda: planner.rejected is not None and planner.rejected.revision == bad)
        assert planner.config_revision == good and planner.config.bounds.max_replicas == 3
        assert planner.rejected is not None and "bounds.max_replicas" in (
            planner.rejected.error or ""
        )
        newer = await store.set_config(pool, "bounds: {max_replicas: 7}\n", expect_revision=bad)
        await _until(lambda: planner.config_revision == newer)
        assert planner.config.bounds.max_replicas == 7
    finally:
        await planner.stop()


async def test_the_lease_admits_one_planner_per_pool(nc: Client) -> None:
    store, pool = await PlannerStore.open(nc), _pool()
    lease = await store.acquire_lease(pool, "a", ttl_s=15, now=1000.0)
    with pytest.raises(LeaseHeldError, match="planned by a"):
        await store.acquire_lease(pool, "b", ttl_s=15, now=1010.0)
    lease = await store.renew_lease(lease, ttl_s=15, now=1010.0)  # a holds it until 1025
    with pytest.raises(LeaseHeldError):
        await store.acquire_lease(pool, "b", ttl_s=15, now=1020.0)
    taken = await store.acquire_lease(pool, "b", ttl_s=15, now=1030.0)  # a's expired
    assert taken.holder == "b"
    with pytest.raises(LeaseLostError):
        await store.renew_lease(
            lease.__class__(pool, "a", 1045.0, lease.revision), ttl_s=15, now=1031.0
        )
    await store.release_lease(taken)
    again = await store.acquire_lease(pool, "a", ttl_s=15, now=1032.0)  # released: free at once
    assert again.holder == "a"


async def test_a_second_planner_for_the_same_pool_is_refused(nc: Client) -> None:
    pool, profile = _pool(), LatencyProfile.default().cloud
    first = Planner(nc, pool, NoWorkers(), profile=profile, planner_id="first")
    await first.start()
    second = Planner(nc, pool, NoWorkers(), profile=profile, planner_id="second")
    try:
        with pytest.raises(LeaseHeldError, match="planned by first"):
            await second.start()
    finally:
        await first.stop()
    await second.start()  # the first gave its lease back on stop
    await second.stop()
    assert second.planner_id == "second"
