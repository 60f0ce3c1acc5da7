"""The worker's /health, /ready and /metrics through its life: loading, serving, draining.

An in-process ``CloudWorker`` with the simulated engine (only the forward pass is
simulated, so no vLLM metrics: the real worker's are scraped in
``test_cloud_route.py``), a real nats-server, and real HTTP over loopback.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud.errors import HttpPortError
from cloud.http import StatusServer
from cloud.settings import CloudSettings
from cloud.sim_engine import SimVllmEngine
from cloud.worker import CloudWorker
from mesh import subjects
from mesh.connection import connect
from mesh.inbox import InboxMux
from mesh.protocol import GenerateAccepted, GenerateRequest, SamplingParams, TokenChunk
from mesh.server import EmbeddedNats, free_port
from models.catalog import DEFAULT_PAIR

pytestmark = pytest.mark.timeout(60)

TANDEM = (
    "tandem_worker_verify_rounds", "tandem_worker_verify_draft_tokens",
    "tandem_worker_verify_accepted_tokens", "tandem_worker_engine_busy_seconds",
    "tandem_worker_draining", "tandem_worker_active_requests", "tandem_worker_ready",
)  # fmt: skip


def metrics(text: str) -> dict[str, float]:
    """Every sample of an exposition by name, summed over its labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@pytest.fixture
async def sim_worker(nats_server: EmbeddedNats) -> AsyncIterator[tuple[CloudWorker, str]]:
    """A worker (engine not started yet) and the root URL of its listening HTTP side."""
    settings = CloudSettings.model_validate(
        {"nats_url": nats_server.url, "engine": "sim", "http_port": free_port(),
         "worker_id": f"sim-http-{uuid.uuid4().hex[:6]}"}
    )  # fmt: skip
    worker = CloudWorker(settings, SimVllmEngine(settings))
    server = StatusServer(worker, settings.http_host, settings.http_port)
    await server.start()
    try:
        yield worker, f"http://{settings.http_host}:{settings.http_port}"
    finally:
        await server.stop()
        await worker.drain()
        worker.engine.shutdown()


async def test_ready_follows_load_subscribe_and_drain_while_health_stays_up(
    sim_worker: tuple[CloudWorker, str], nats_server: EmbeddedNats
) -> None:
    worker, root = sim_worker
    async with httpx.AsyncClient(base_url=root, timeout=5) as http:

        async def ready() -> tuple[int, str | None]:
            resp = await http.get("/ready")
            return resp.status_code, resp.json()["reason"]

        assert (await http.get("/health")).json()["worker_id"] == worker.settings.worker_id
        assert await ready() == (503, "the engine is loading")
        await worker.engine.start()
        assert await ready() == (503, "not subscribed on NATS yet")
        await worker.start()
        assert await ready() == (200, None)
        before = metrics((await http.get("/metrics")).text)
        assert before["tandem_worker_ready"] == 1 and before["tandem_worker_draining"] == 0

        nc = await connect(nats_server.url, name="test-http")
        inboxes = InboxMux()
        try:
            inbox, queue = await inboxes.open(nc)
            request = GenerateRequest(
                request_id=uuid.uuid4().hex,
                model=DEFAULT_PAIR,
                messages=[{"role": "user", "content": "Count to fifty."}],
                sampling=SamplingParams(max_tokens=60, temperature=0),
                reply_subject=inbox,
            )
            subject = subjects.worker(worker.settings.worker_id, "generate")
            reply = await nc.request(subject, request.to_bytes(), timeout=10)
            assert GenerateAccepted.from_bytes(reply.data).worker_id == worker.settings.worker_id
            first = TokenChunk.from_bytes((await asyncio.wait_for(queue.get(), 20)).data)
            assert not first.is_end
            during = metrics((await http.get("/metrics")).text)
            drain = asyncio.create_task(worker.drain())  # SIGTERM's path in run_worker
            await asyncio.sleep(0)
            # Draining with the answer still streaming: not ready, but alive.
            assert await ready() == (503, "draining")
            assert (await http.get("/health")).status_code == 200
            draining = metrics((await http.get("/metrics")).text)
            chunks = [first]
            while not chunks[-1].is_end:
                chunks.append(TokenChunk.from_bytes((await asyncio.wait_for(queue.get(), 20)).data))
            await drain
            inboxes.close(inbox)
        finally:
            await nc.close()
        after = metrics((await http.get("/metrics")).text)
        assert (await http.get("/health")).status_code == 200

    assert set(TANDEM) <= {name.removesuffix("_total") for name in after}
    assert during["tandem_worker_active_requests"] == 1
    assert draining["tandem_worker_draining"] == 1 and draining["tandem_worker_ready"] == 0
    assert chunks[-1].finish_reason in {"stop", "length"}
    assert after["tandem_worker_active_requests"] == 0
    assert after["tandem_worker_engine_busy_seconds_total"] > 0
    assert after["tandem_worker_verify_rounds_total"] == 0  # the sim engine does not verify
    assert not any(name.startswith("vllm:") for name in after)  # no vLLM in this process


async def test_unknown_paths_methods_and_garbage_get_http_errors(
    sim_worker: tuple[CloudWorker, str],
) -> None:
    _, root = sim_worker
    async with httpx.AsyncClient(base_url=root, timeout=5) as http:
        missing = await http.get("/nope")
        posted = await http.post("/ready")
        head = await http.head("/health")
    host, port = root.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"not http at all\r\n\r\n")
    garbage = await reader.read()
    writer.close()
    assert missing.status_code == 404
    assert posted.status_code == 405
    assert head.status_code == 200 and head.content == b""
    assert garbage.startswith(b"HTTP/1.1 400 ")


async def test_a_taken_port_fails_start_up_with_one_clear_line(
    sim_worker: tuple[CloudWorker, str],
) -> None:
    worker, _ = sim_worker
    clash = StatusServer(worker, worker.settings.http_host, worker.settings.http_port)
    with pytest.raises(HttpPortError) as failure:
        await clash.start()
    assert "--http-port" in str(failure.value)
    assert str(worker.settings.http_port) in str(failure.value)
