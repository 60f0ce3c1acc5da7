"""A cloud worker's stream_interval groups tokens after the first, and a request that is
not streamed gets its tokens in a few chunks, over real NATS.

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


async def _chunks(
    nats_url: str, interval: int, max_tokens: int, *, streaming: bool = True, **more: Any
) -> list[TokenChunk]:
    """Every chunk of one answer from a worker with ``stream_interval=interval`` (and the
    other settings in ``more``) to a request with ``streaming``."""
    worker_id = f"sim-interval-{interval}-{uuid.uuid4().hex[:6]}"
    settings = CloudSettings.model_validate(
        {
            "nats_url": nats_url,
            "worker_id": worker_id,
            "engine": "sim",
            "stream_interval": interval,
            **more,
        }
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
            streaming=streaming,
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


def _content(chunks: list[TokenChunk]) -> list[TokenChunk]:
    return [c for c in chunks if c.token_ids and not c.error]


async def test_an_answer_not_streamed_sends_its_first_token_then_waits_for_a_keepalive(
    nats_server: EmbeddedNats,
) -> None:
    streamed = await _chunks(nats_server.url, 1, max_tokens=11)
    # The whole answer takes ~0.6 s of simulated decoding, well inside the keepalive
    # period: the first token goes at once (the edge's time to first token), the rest
    # rides in the end chunk.
    whole = await _chunks(nats_server.url, 1, max_tokens=11, streaming=False, keepalive_s=10)
    assert [len(c.token_ids) for c in _content(whole)] == [1, 10]
    assert len(whole) == 2 and whole[-1].is_end
    tokens = [t for c in _content(streamed) for t in c.token_ids]
    assert [t for c in whole for t in c.token_ids] == tokens
    assert "".join(c.text for c in whole) == "".join(c.text for c in _content(streamed))
    usage = whole[-1].usage
    assert usage is not None and usage.completion_tokens == 11


async def test_an_answer_not_streamed_still_sends_what_it_has_each_keepalive_period(
    nats_server: EmbeddedNats,
) -> None:
    # 40 decode steps of ~56 ms each (the shipped profile) against a send every 0.5-0.75 s:
    # several chunks (a failover resumes from them), far fewer than one per token.
    chunks = await _chunks(nats_server.url, 1, max_tokens=40, streaming=False, keepalive_s=0.5)
    sizes = [len(c.token_ids) for c in _content(chunks)]
    assert sum(sizes) == 40
    assert 2 <= len(sizes) <= 20, sizes
    assert [c.seq for c in chunks] == list(range(len(chunks)))
