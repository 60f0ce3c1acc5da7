"""The cloud streaming protocol over a real nats-server, with a minimal worker."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from mesh import subjects
from mesh.protocol import (
    GenerateAccepted,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from mesh.sequencer import ChunkSequencer

pytestmark = pytest.mark.timeout(60)

# A model name of this module alone: real workers on the shared server never take it.
MODEL = "tests.mesh/streaming-model"


async def serve_reversed(nc: Client, worker_id: str) -> None:
    """A worker that accepts, checks the requester is alive, then streams out of order."""

    async def handle_generate(msg: Msg) -> None:
        request = GenerateRequest.from_bytes(msg.data)
        accepted = GenerateAccepted(request_id=request.request_id, worker_id=worker_id)
        await msg.respond(accepted.to_bytes())
        await nc.request(subjects.liveness(request.reply_subject), b"", timeout=5)
        start = len(request.resume_token_ids)
        chunks = [
            TokenChunk(request_id=request.request_id, seq=i, token_ids=[start + i], text="x")
            for i in range(4)
        ] + [TokenChunk(request_id=request.request_id, seq=4, is_end=True, finish_reason="stop")]
        # A duplicate, then reversed: the receiver must drop the copy and restore order.
        for chunk in [chunks[1], *reversed(chunks)]:
            await nc.publish(request.reply_subject, chunk.to_bytes())
        await nc.flush()

    await nc.subscribe(subjects.cloud_generate(MODEL), queue="q", cb=handle_generate)


async def test_a_stream_arrives_whole_and_in_order(nc: Client) -> None:
    await serve_reversed(nc, "cloud-1")
    inbox = nc.new_inbox()
    received: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(inbox, cb=received.put)

    async def answer_alive(msg: Msg) -> None:
        await msg.respond(b"")

    await nc.subscribe(subjects.liveness(inbox), cb=answer_alive)
    request = GenerateRequest(
        request_id="req-7",
        model=MODEL,
        messages=[{"role": "user", "content": "count"}],
        sampling=SamplingParams(max_tokens=4, temperature=0.0),
        resume_token_ids=[100, 101],
        reply_subject=inbox,
    )
    reply = await nc.request(subjects.cloud_generate(MODEL), request.to_bytes(), timeout=5)
    assert GenerateAccepted.from_bytes(reply.data).worker_id == "cloud-1"

    order = ChunkSequencer(request.request_id)
    delivered: list[TokenChunk] = []
    while not order.done:
        msg = await asyncio.wait_for(received.get(), 5)
        delivered += order.push(TokenChunk.from_bytes(msg.data))
    order.finish()
    assert [c.seq for c in delivered] == [0, 1, 2, 3, 4]
    assert [t for c in delivered for t in c.token_ids] == [2, 3, 4, 5]
    assert delivered[-1].finish_reason == "stop"
