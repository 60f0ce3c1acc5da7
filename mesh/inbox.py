"""One wildcard subscription for all of a connection's answer streams.

A cloud answer streams back to an inbox of the edge's, and the worker probes
``<inbox>.alive`` to learn the edge still wants it. Subscribing twice per request
costs two SUB and two UNSUB round trips to the server and two nats-py reader
tasks per call; at thousands of calls that was a visible share of the edge's CPU.
So, as nats-py does for its own request/reply, the edge subscribes once to
``<prefix>.>`` and hands each message to the stream its subject names. An inbox
answers ``.alive`` exactly while it is open, as its own subscription did.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from nats.aio.client import Client
from nats.aio.msg import Msg

from mesh.subjects import LIVENESS_SUFFIX


class InboxMux:
    """Open and close per-request inboxes on one subscription of the current client."""

    def __init__(self) -> None:
        self._nc: Client | None = None
        self._prefix = ""
        self._streams: dict[str, asyncio.Queue[Msg]] = {}
        self._lock = asyncio.Lock()

    async def open(self, nc: Client) -> tuple[str, asyncio.Queue[Msg]]:
        """A fresh inbox subject on ``nc`` and the queue its messages arrive in."""
        if nc is not self._nc:  # first use, or the link made a new client
            async with self._lock:
                if nc is not self._nc:
                    prefix = nc.new_inbox()
                    await nc.subscribe(f"{prefix}.>", cb=self._dispatch)
                    await nc.flush()  # the server has it before anyone is told the inbox
                    self._nc, self._prefix = nc, prefix
        inbox = f"{self._prefix}.{uuid.uuid4().hex}"
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._streams[inbox] = queue
        return inbox, queue

    def close(self, inbox: str) -> None:
        """Stop delivering to ``inbox`` and stop answering its liveness probes."""
        self._streams.pop(inbox, None)

    @property
    def open_inboxes(self) -> int:
        """Inboxes open now (requests waiting on a cloud stream)."""
        return len(self._streams)

    async def _dispatch(self, msg: Msg) -> None:
        queue = self._streams.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)
            return
        subject = msg.subject
        if subject.endswith(LIVENESS_SUFFIX) and subject[: -len(LIVENESS_SUFFIX)] in self._streams:
            with contextlib.suppress(Exception):  # the prober may be gone; nothing to do
                await msg.respond(b"")
        # Anything else is late: a stream already closed (an abandoned attempt).
