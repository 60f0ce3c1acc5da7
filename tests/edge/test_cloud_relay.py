"""The edge's relay of a cloud stream: chunks queued together go out as one event.

The relay reads a NATS inbox's queue; here the queue is filled with the worker's own
wire bytes (``TokenChunk.to_bytes``) before or between reads, so which chunks
"arrived together" is fixed by the test, not by the network's timing.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from edge.cloud_route import CloudRoute
from edge.errors import CloudRequestError
from edge.generation import FinishEvent, TokenEvent
from mesh.connection import MeshLink
from mesh.heartbeat import FleetView
from mesh.protocol import ErrorCode, ErrorInfo, StreamUsage, TokenChunk, TokenLogprob

pytestmark = pytest.mark.timeout(10)

ATTEMPT = "req.0"


def _route() -> CloudRoute:
    # Never connected: the relay only reads the queue it is given.
    return CloudRoute(MeshLink("nats://127.0.0.1:1", name="relay-test"), FleetView(Client()), "m")


def _msg(chunk: TokenChunk) -> Msg:
    return Msg(_client=Client(), subject="_INBOX.x.y", data=chunk.to_bytes())


def _token(seq: int, token: int, text: str, logprob: float | None = None) -> TokenChunk:
    logprobs = None if logprob is None else [TokenLogprob(logprob=logprob)]
    return TokenChunk(request_id=ATTEMPT, seq=seq, token_ids=[token], text=text, logprobs=logprobs)


def _end(seq: int) -> TokenChunk:
    usage = StreamUsage(prompt_tokens=3, completion_tokens=4, worker_id="w")
    return TokenChunk(request_id=ATTEMPT, seq=seq, is_end=True, finish_reason="stop", usage=usage)


async def test_a_first_chunk_alone_goes_out_at_once_and_a_burst_as_one_event() -> None:
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    received: list[int] = []
    relay = _route()._relay(queue, ATTEMPT, received, "w")
    queue.put_nowait(_msg(_token(0, 10, "a")))
    first = await anext(relay)
    # Chunks that were queued together (a keepalive among them), then the end.
    queue.put_nowait(_msg(_token(2, 12, "c")))  # out of order: the sequencer fixes it
    queue.put_nowait(_msg(_token(1, 11, "b")))
    queue.put_nowait(_msg(TokenChunk(request_id=ATTEMPT, seq=3)))  # a keepalive
    queue.put_nowait(_msg(_token(4, 13, '\n"d"')))
    queue.put_nowait(_msg(_end(5)))
    rest = [event async for event in relay]

    assert first == TokenEvent([10], "a", None)
    assert rest[0] == TokenEvent([11, 12, 13], 'bc\n"d"', None)
    assert len(rest) == 2 and isinstance(rest[1], FinishEvent)
    assert rest[1].stats.completion_tokens == 4 and rest[1].stats.finish_reason == "stop"
    assert received == [10, 11, 12, 13]


async def test_logprobs_stay_one_per_token_when_chunks_merge() -> None:
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    for chunk in (_token(0, 10, "a", -0.5), _token(1, 11, "b", -1.5), _token(2, 12, "c")):
        queue.put_nowait(_msg(chunk))
    queue.put_nowait(_msg(_end(3)))
    events = [event async for event in _route()._relay(queue, ATTEMPT, [], "w")]

    tokens = [e for e in events if isinstance(e, TokenEvent)]
    # The chunk without logprobs is not merged into the ones with them.
    assert [(e.token_ids, e.text) for e in tokens] == [([10, 11], "ab"), ([12], "c")]
    assert [lp.logprob for lp in tokens[0].logprobs or []] == [-0.5, -1.5]
    assert tokens[1].logprobs is None
    assert isinstance(events[-1], FinishEvent)


async def test_tokens_before_an_error_in_the_same_burst_are_still_relayed() -> None:
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    error = ErrorInfo(code=ErrorCode.SERVER_ERROR, message="engine died")
    queue.put_nowait(_msg(_token(0, 10, "a")))
    queue.put_nowait(
        _msg(TokenChunk(request_id=ATTEMPT, seq=1, is_end=True, finish_reason="error", error=error))
    )
    relay = _route()._relay(queue, ATTEMPT, [], "w")
    first = await anext(relay)
    with pytest.raises(CloudRequestError) as failed:
        await anext(relay)
    assert first == TokenEvent([10], "a", None)
    assert failed.value.info.code is ErrorCode.SERVER_ERROR
