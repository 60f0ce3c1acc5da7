"""The edge's inbox multiplexer over a real nats-server: routing, liveness, late messages."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.aio.client import Client

from mesh import subjects
from mesh.connection import connect
from mesh.inbox import InboxMux
from mesh.server import EmbeddedNats

pytestmark = pytest.mark.timeout(30)


async def test_each_inbox_gets_its_own_messages_and_answers_alive_while_open(
    nc: Client, nats_server: EmbeddedNats
) -> None:
    sender = await connect(nats_server.url, name="test-inbox-sender")
    mux = InboxMux()
    try:
        (first, first_q), (second, second_q) = await mux.open(nc), await mux.open(nc)
        assert first != second and mux.open_inboxes == 2
        await nc.flush()  # the subscription is on the server before another client sends
        await sender.publish(second, b"to-second")
        await sender.publish(first, b"to-first")
        assert (await asyncio.wait_for(first_q.get(), 5)).data == b"to-first"
        assert (await asyncio.wait_for(second_q.get(), 5)).data == b"to-second"
        # A worker's "still there?" probe is answered while the inbox is open ...
        await sender.request(subjects.liveness(first), b"", timeout=2)
        mux.close(first)
        # ... and not after: the worker gives up and aborts the generation.
        with pytest.raises(nats.errors.TimeoutError):
            await sender.request(subjects.liveness(first), b"", timeout=0.5)
        await sender.publish(first, b"late")  # a late chunk of a closed stream is dropped
        await sender.publish(second, b"still-here")
        assert (await asyncio.wait_for(second_q.get(), 5)).data == b"still-here"
        assert first_q.empty() and mux.open_inboxes == 1
    finally:
        await sender.close()


async def test_a_new_client_gets_a_new_subscription(nats_server: EmbeddedNats) -> None:
    mux = InboxMux()
    old = await connect(nats_server.url, name="test-inbox-old")
    new = await connect(nats_server.url, name="test-inbox-new")
    try:
        old_inbox, _ = await mux.open(old)
        new_inbox, new_q = await mux.open(new)
        assert old_inbox.rsplit(".", 1)[0] != new_inbox.rsplit(".", 1)[0]
        # The edge sends its request on the connection that subscribed, so the server
        # has the subscription first; here the sender is another connection: a flush
        # makes sure the server registered it before the publish (else a lost race).
        await new.flush()
        await old.publish(new_inbox, b"x")
        assert (await asyncio.wait_for(new_q.get(), 5)).data == b"x"
    finally:
        await old.close()
        await new.close()
