"""The planner's identity (``mesh.security``'s ``planner`` role) against a real nats-server
running ``tandem mesh``'s configuration: what the planner needs works, what it does
not need is refused by the server (reported asynchronously to ``error_cb``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from cloud.planner import Planner
from cloud.planner_config import PlannerStore
from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.protocol import NodeHeartbeat, NodeLoad, PlannerDecision
from mesh.security import MeshDir, Role
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from models.latency import LatencyProfile
from tests.cloud.fixed_pool import FixedPool
from tests.fixtures_nats import mesh_with

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    identities: dict[str, Role] = {"operator": "operator", "planner-1": "planner", "w1": "worker"}
    return mesh_with(tmp_path_factory.mktemp("mesh"), identities)


@pytest.fixture(scope="module")
def hub(mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(config=mesh_dir.auth_conf) as server:
        yield server


async def _as(hub: EmbeddedNats, mesh: MeshDir, name: str) -> tuple[Client, list[str]]:
    refusals: list[str] = []

    async def error_cb(exc: Exception) -> None:
        refusals.append(str(exc).lower())

    creds = MeshCredentials(mesh.creds(name))
    return await connect(hub.url, name=name, credentials=creds, error_cb=error_cb), refusals


async def _refused(refusals: list[str], what: str, wait_s: float = 2.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if any(what.lower() in r and "permissions violation" in r for r in refusals):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_the_planner_reads_its_config_holds_its_lease_and_publishes_decisions(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator, _ = await _as(hub, mesh_dir, "operator")
    planner_nc, refusals = await _as(hub, mesh_dir, "planner-1")
    worker, _ = await _as(hub, mesh_dir, "w1")
    decisions: list[PlannerDecision] = []

    async def on_decision(msg: Msg) -> None:
        decisions.append(PlannerDecision.from_bytes(msg.data))

    try:
        store = await PlannerStore.open(operator)  # the operator creates and writes
        await store.set_config(
            "secure", "bounds: {min_replicas: 1, max_replicas: 1}\n", expect_revision=0
        )
        await operator.subscribe(subjects.all_planner_decisions(), cb=on_decision)  # tandem status
        planner = Planner(
            planner_nc, "secure", FixedPool("w1"), profile=LatencyProfile.default().cloud
        )
        await planner.start()  # lease (create), config (get, watch), heartbeats (subscribe)
        try:
            load = NodeLoad(
                running=0, waiting=0, kv_cache_usage=0, tokens_per_s=0, requests_total=0
            )
            beat = NodeHeartbeat(
                node_id="w1", role="cloud", model=DEFAULT_PAIR, version="0", load=load
            )
            deadline = time.monotonic() + 5
            while not planner.fleet.nodes():
                assert time.monotonic() < deadline, "the planner never heard the worker"
                await worker.publish(subjects.node_load("w1"), beat.to_bytes())
                await asyncio.sleep(0.05)
            decision = await planner.tick()
            assert planner.config_revision == 1 and (decision.ready, decision.action) == (1, "hold")
            deadline = time.monotonic() + 5
            while not decisions:
                assert time.monotonic() < deadline, "the operator never saw a decision"
                await asyncio.sleep(0.02)
        finally:
            await planner.stop()  # release: a compare-and-set update
        assert decisions[0].planner_id == planner.planner_id and decisions[0].pool == "secure"
        assert not [r for r in refusals if "permissions violation" in r]
    finally:
        for nc in (operator, planner_nc, worker):
            await nc.close()


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("publish", subjects.cloud_generate(DEFAULT_PAIR)),  # it never serves or asks for work
        ("publish", f"$KV.{subjects.POLICY_BUCKET}.{subjects.POLICY_KEY}"),  # the routing policy
        ("publish", subjects.node_load("w1")),  # a worker's heartbeat
        ("subscribe", "_INBOX.operator.>"),  # another node's inbox
        ("subscribe", subjects.cloud_generate(DEFAULT_PAIR)),  # the requests themselves
    ],
)
async def test_the_planner_is_refused_what_it_does_not_need(
    hub: EmbeddedNats, mesh_dir: MeshDir, action: str, subject: str
) -> None:
    nc, refusals = await _as(hub, mesh_dir, "planner-1")
    try:
        if action == "publish":
            await nc.publish(subject, b"x")
        else:
            await nc.subscribe(subject)
        await nc.flush()
        assert await _refused(refusals, subject), f"{action} {subject} was not refused"
    finally:
        await nc.close()


async def test_the_planner_sizes_for_the_routing_policys_slo_unless_its_config_sets_one(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    """One SLO for router and planner: a pool config without ``slo`` follows the policy's,
    live; a field the config sets wins. The planner reads the policy, never writes it."""
    from router.store import PolicyStore

    operator, _ = await _as(hub, mesh_dir, "operator")
    planner_nc, refusals = await _as(hub, mesh_dir, "planner-1")
    try:
        policies = await PolicyStore.open(operator)
        current = await policies.current()
        revision = await policies.set(
            "slo: {ttft_p95_ms: 900, itl_p95_ms: 120}\n",
            expect_revision=current.revision if current else 0,
        )
        planner = Planner(
            planner_nc, "follows-policy", FixedPool("w1"), profile=LatencyProfile.default().cloud
        )
        await planner.start()
        try:
            deadline = time.monotonic() + 5
            while planner.slo_targets_ms() != (900, 120):
                assert time.monotonic() < deadline, f"policy slo not followed: {planner.policy_slo}"
                await asyncio.sleep(0.05)
            await policies.set("slo: {itl_p95_ms: 80}\n", expect_revision=revision)
            deadline = time.monotonic() + 5
            while planner.slo_targets_ms() != (2000, 80):  # TTFT back to the built-in default
                assert time.monotonic() < deadline, f"revision not followed: {planner.policy_slo}"
                await asyncio.sleep(0.05)
            store = await PlannerStore.open(operator)
            own = "slo: {ttft_p95_ms: 1500}\n"
            await store.set_config("follows-policy", own, expect_revision=0)
            deadline = time.monotonic() + 5
            while planner.slo_targets_ms() != (1500, 80):  # the pool's own field wins
                assert time.monotonic() < deadline, "the pool's slo did not override"
                await asyncio.sleep(0.05)
        finally:
            await planner.stop()
        assert not [r for r in refusals if "permissions violation" in r]
    finally:
        for nc in (operator, planner_nc):
            await nc.close()
