"""A cloud worker's stream_interval groups tokens after the first, over real NATS.

An in-process ``CloudWorker`` with the simulated engine (only the forward pass is
simulated), a real nats-server, and the edge's own inbox multiplexer on the other
side, which also answers the worker's liveness probes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from cloud.settings import CloudSettings
from cloud.sim_engine import SimVllmEngine
from cloud.worker import CloudWorker
from mesh import subjects
from mesh.connection import connect
from mesh.inbox import InboxMux
from mesh.protocol import GenerateAccepted, GenerateRequest, SamplingParams, TokenChunk
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR

pytestmark = pytest.mark.timeout(60)

MODEL = DEFAULT_PAIR
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Count to ten."}]


async def _chunks(nats_url: str, interval: int, max_tokens: int) -> list[TokenChunk]:
    """Every chunk of one answer from a worker with ``stream_interval=interval``."""
    worker_id = f"sim-interval-{interval}-{uuid.uuid4().hex[:6]}"
    settings = CloudSettings.model_validate(
        {"nats_url": nats_url, "worker_id": worker_id, "engine": "sim", "stream_interval": interval}
    )
    engine = SimVllmEngine(settings)
    await engine.start()
    worker = CloudWorker(settings, engine)
    await worker.start()
    nc = await connect(nats_url, name="test-stream-interval")
    inboxes = InboxMux()
    try:
        inbox, queue = await inboxes.open(nc)
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            model=MODEL,
            messages=MESSAGES,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
            reply_subject=inbox,
        )
        reply = await nc.request(
            subjects.worker(worker_id, "generate"), request.to_bytes(), timeout=10
        )
        assert GenerateAccepted.from_bytes(reply.data).worker_id == worker_id
        chunks: list[TokenChunk] = []
        while not (chunks and chunks[-1].is_end):
            msg = await asyncio.wait_for(queue.get(), 20)
            chunks.append(TokenChunk.from_bytes(msg.data))
        inboxes.close(inbox)
        return chunks
    finally:
        await nc.close()
        await worker.drain()
        engine.shutdown()


async def test_tokens_after_the_first_travel_in_groups(nats_server: EmbeddedNats) -> None:
    one_by_one = await _chunks(nats_server.url, 1, max_tokens=11)
    grouped = await _chunks(nats_server.url, 4, max_tokens=11)

    def content(chunks: list[TokenChunk]) -> list[TokenChunk]:
        return [c for c in chunks if c.token_ids and not c.error]

    singles, groups = content(one_by_one), content(grouped)
    assert [len(c.token_ids) for c in singles] == [1] * 11
    # The first token alone (time to first token), then 4 at a time, the rest at the end.
    assert [len(c.token_ids) for c in groups] == [1, 4, 4, 2]
    assert [t for c in groups for t in c.token_ids] == [t for c in singles for t in c.token_ids]
    assert "".join(c.text for c in groups) == "".join(c.text for c in singles)
    assert [c.seq for c in grouped] == list(range(len(grouped)))
    for chunks in (one_by_one, grouped):
        usage = chunks[-1].usage
        assert chunks[-1].is_end and usage is not None and usage.completion_tokens == 11
