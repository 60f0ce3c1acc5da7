"""The planner through the local connector: real simulated worker processes
(``tandem cloud serve --engine sim``) on a real nats-server, started and drained.

A scale-down drains the least-loaded workers, several in one step, and every request
in flight on them finishes there (none lost, none failed over); a worker that never becomes ready is
removed and reported, and the planner orders a replacement after its backoff.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from cloud.planner import Planner, replica_capacity_rps
from cloud.planner_config import PlannerConfig
from cloud.planner_connectors import LocalConnector
from mesh import subjects
from mesh.connection import connect
from mesh.protocol import (
    GenerateAccepted,
    GenerateRequest,
    NodeHeartbeat,
    NodeLoad,
    SamplingParams,
    TokenChunk,
)
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from models.latency import LatencyProfile
from tandem.commands.planner import local_spawner
from tandem.local import serves
from tandem.supervisor import Supervisor
from tests.cloud.fixed_pool import FixedPool

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, name="planner-local-test")
    yield client
    await client.close()


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    with Supervisor() as sup:
        yield sup


async def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not in {timeout_s} s"
        await asyncio.sleep(0.05)


async def _generate(nc: Client, worker_id: str, max_tokens: int) -> list[TokenChunk]:
    """One generation on ``worker_id``'s own subject, as an edge streams it (and answers
    the worker's liveness probes); every chunk up to the end."""
    inbox = nc.new_inbox()
    chunks: list[TokenChunk] = []
    done = asyncio.Event()

    async def on_chunk(msg: Msg) -> None:
        chunk = TokenChunk.from_bytes(msg.data)
        chunks.append(chunk)
        if chunk.is_end:
            done.set()

    async def on_probe(msg: Msg) -> None:
        await msg.respond(b"")

    subs = [
        await nc.subscribe(inbox, cb=on_chunk),
        await nc.subscribe(subjects.liveness(inbox), cb=on_probe),
    ]
    request = GenerateRequest(
        request_id=uuid.uuid4().hex, model=DEFAULT_PAIR, reply_subject=inbox,
        messages=[{"role": "user", "content": "Plan the next step."}],
        sampling=SamplingParams(max_tokens=max_tokens),
    )  # fmt: skip
    reply = await nc.request(subjects.worker(worker_id, "generate"), request.to_bytes(), timeout=5)
    assert GenerateAccepted.from_bytes(reply.data).worker_id == worker_id
    await asyncio.wait_for(done.wait(), 60)
    for sub in subs:
        await sub.unsubscribe()
    return chunks


def _running(planner: Planner, workers: list[str]) -> dict[str, int]:
    """Requests in flight on each of ``workers``, as the planner's heartbeats show them."""
    seen = {b.node_id: b.load.running + b.load.waiting for b in planner.fleet.nodes()}
    return {w: seen[w] for w in workers if w in seen}


async def test_scale_down_drains_the_least_loaded_workers_at_once_and_loses_no_request(
    nats_server: EmbeddedNats, nc: Client, supervisor: Supervisor
) -> None:
    prefix = f"sim-{uuid.uuid4().hex[:4]}"
    connector = LocalConnector(
        local_spawner(supervisor, nats_server.url, engine="sim"), prefix=prefix
    )
    config = PlannerConfig.model_validate(
        {"bounds": {"min_replicas": 1, "max_replicas": 3}, "scale_down_cooldown_s": 0}
    )
    planner = Planner(nc, prefix, connector, profile=LatencyProfile.default().cloud, config=config)
    await planner.start()
    try:
        busy, quiet, idle = await connector.scale_up(3)
        await _until(
            lambda: all(serves(nats_server, w) for w in (busy, quiet, idle)), 60, "workers"
        )
        # Three answers on one worker, one on another, none on the third: one step
        # drains the two quieter ones, least loaded first, and keeps the busy one.
        work = [asyncio.create_task(_generate(nc, w, 80)) for w in (busy, busy, busy, quiet)]
        load = {busy: 3, quiet: 1, idle: 0}
        await _until(lambda: _running(planner, list(load)) == load, 10, "load")
        decision = await planner.tick()
        assert (decision.action, decision.drained, decision.target) == ("scale_down", quiet, 1)
        first = planner.decisions[-2]  # one decision per drained worker, each with its target
        assert (first.action, first.drained, first.target) == ("scale_down", idle, 2)
        assert await connector.workers() == [busy]
        answers = await asyncio.gather(*work)
        await connector.wait_drained()
    finally:
        await planner.stop()
        await connector.close()
    for chunks in answers:  # each complete, in order, on the worker it started on
        end = chunks[-1]
        assert end.is_end and end.error is None and end.finish_reason == "length"
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert end.usage is not None and end.usage.completion_tokens == 80
    assert answers[3][-1].usage.worker_id == quiet  # type: ignore[union-attr]
    # Both drained and exited cleanly, before ``close`` drained the busy one.
    assert sorted(connector.drained[:2]) == sorted([(idle, 0), (quiet, 0)])


async def test_a_worker_that_never_gets_ready_is_removed_and_replaced_after_backoff(
    nats_server: EmbeddedNats, nc: Client, supervisor: Supervisor
) -> None:
    prefix = f"stuck-{uuid.uuid4().hex[:4]}"
    # Workers pointed at a port nothing listens on: they run, and are never heard from.
    spawn = local_spawner(supervisor, "nats://127.0.0.1:9", engine="sim")
    connector = LocalConnector(spawn, prefix=prefix)
    config = PlannerConfig.model_validate({"bounds": {"min_replicas": 1}, "ready_timeout_s": 10})
    now = [500.0]
    planner = Planner(
        nc, prefix, connector, profile=LatencyProfile.default().cloud, config=config,
        clock=lambda: now[0],
    )  # fmt: skip
    await planner.start()
    try:
        first = await planner.tick()
        assert (first.action, first.target) == ("scale_up", 1)
        now[0] += 11  # past the ready timeout, never heard from
        stuck = await planner.tick()
        assert stuck.action == "error" and f"{prefix}-0 not ready in 10 s" in (stuck.error or "")
        await connector.wait_drained()
        assert await connector.workers() == []
        now[0] += 0.5
        assert (await planner.tick()).action == "hold"  # backing off, 1 s
        now[0] += 1
        retry = await planner.tick()
        assert (retry.action, retry.target) == ("scale_up", 1)  # the minimum, again
        assert await connector.workers() == [f"{prefix}-1"]
    finally:
        await planner.stop()
        await connector.close()


async def test_each_decision_records_the_forecast_mean_its_bounded_band_and_the_measured_shape(
    nc: Client,
) -> None:
    """Heartbeats on a real nats-server, the planner's clock stepped by hand: every
    decision's forecast is its mean plus a band of at most ``band_max_share`` of it (a
    step in demand makes the filter's own band wider than that), and capacity is
    derived from the shape the heartbeats measured (400-token prompts, 20 out), not
    the configured one (600 and 40)."""
    now = [1000.0]
    config = PlannerConfig.model_validate(
        {"forecaster": "kalman", "band_max_share": 0.1, "engine_start_s": 20,
         "bounds": {"min_replicas": 2, "max_replicas": 2}}
    )  # fmt: skip
    pool = f"shape-{uuid.uuid4().hex[:4]}"
    planner = Planner(
        nc, pool, FixedPool("w1", "w2"), profile=LatencyProfile.default().cloud, config=config,
        clock=lambda: now[0],
    )  # fmt: skip
    await planner.start()
    # Both workers served 500 requests of 1,000-token prompts before the planner looked:
    # that past is not the pool's shape now (totals since a worker's start would say so).
    totals = {"w1": 500, "w2": 500}
    prompts = {"w1": 500_000, "w2": 500_000}
    cut: list[float] = []  # how much the bound took off each decision's band
    try:
        for sample in range(16):
            per_worker = 10 if sample < 12 else 40  # 4 calls/s, then 16
            for worker in totals:
                totals[worker] += per_worker
                prompts[worker] += 400 * per_worker
                n = totals[worker]
                load = NodeLoad(
                    running=0, waiting=0, kv_cache_usage=0, tokens_per_s=0, requests_total=n,
                    prompt_tokens_total=prompts[worker], output_tokens_total=20 * n,
                )  # fmt: skip
                beat = NodeHeartbeat(
                    node_id=worker, role="cloud", model=DEFAULT_PAIR, version="0", load=load
                )
                await nc.publish(subjects.node_load(worker), beat.to_bytes())
            await _until(
                lambda: {b.node_id: b.load.requests_total for b in planner.fleet.nodes()}
                == totals,
                5, "the beats",
            )  # fmt: skip
            decision = await planner.tick()
            assert decision.forecast_rps == pytest.approx(
                max(0.0, decision.forecast_mean_rps + decision.forecast_band_rps), abs=1e-3
            )
            assert decision.forecast_band_rps <= 0.1 * max(decision.forecast_mean_rps, 0) + 1e-3
            cut.append(planner.forecast().band(config.band_z) - decision.forecast_band_rps)
            now[0] += config.sample_s
    finally:
        await planner.stop()
    assert decision.measured_rps == pytest.approx(16.0)
    assert max(cut[12:]) > 0.01  # after the step the bound did bite
    ttft_ms, itl_ms = planner.slo_targets_ms()
    uncached = round(400 * (1 - config.workload.cached_share))
    expected = replica_capacity_rps(
        LatencyProfile.default().cloud, uncached, 20, ttft_ms / 1e3, itl_ms / 1e3,
        config.ttft_quantile,
    )  # fmt: skip
    assert expected > 0 and decision.capacity_rps == pytest.approx(expected, abs=1e-3)
