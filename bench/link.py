"""An edge-cloud link the fault rounds can cut or degrade: a TCP relay in user space.

The edge's NATS connection goes through this relay instead of straight to nats-server;
the workers connect directly, so an impairment touches the edge-cloud link and
nothing else (the agent's HTTP to the edge is never on it).

Why not ``ip netns`` and ``tc netem``: this machine's kernel has no ``sch_netem``
("Specified qdisc kind is unknown", and no modules to load), so the delay and loss are
emulated here, and the figures that use them say so:

- ``cut()``: a partition. Bytes in both directions are held, never delivered, and the
  connections stay open (no reset, as when packets are dropped on the way); new
  connections are accepted and get nothing either. ``heal()`` delivers what was held,
  in order, as TCP's retransmissions would.
- ``degrade(delay_s, loss)``: each read is delivered ``delay_s`` later in its direction;
  with probability ``loss`` it waits one more retransmission timeout first (Linux's
  minimum 200 ms plus the round trip), and what follows waits behind it, in order, as
  a lost TCP segment holds up the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from types import TracebackType
from typing import Self

_RTO_MIN_S = 0.2  # Linux's minimum retransmission timeout


class LinkEmulator:
    """A relay from a local port to ``upstream`` (host, port), run on its own thread."""

    def __init__(self, upstream: tuple[str, int], *, seed: int = 17) -> None:
        self.upstream = upstream
        self.port = 0
        self._random = random.Random(seed)
        self._cut = False
        self._delay_s = 0.0
        self._loss = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """The NATS URL the edge is given: this relay."""
        return f"nats://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0, family=socket.AF_INET)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy one direction, in order, each read held as the link's state says."""
        due = 0.0  # when the previous read is delivered: nothing overtakes it
        try:
            while data := await src.read(65536):
                now = time.monotonic()
                hold = self._delay_s
                if self._loss and self._random.random() < self._loss:
                    hold += _RTO_MIN_S + 2 * self._delay_s
                due = max(due, now + hold)
                while self._cut or time.monotonic() < due:  # noqa: ASYNC110 (polls a flag)
                    await asyncio.sleep(0.01 if self._cut else due - time.monotonic())
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def cut(self) -> None:
        """A partition: nothing gets through either way until ``heal``."""
        self._cut = True

    def degrade(self, delay_s: float, loss: float) -> None:
        """Each direction: ``delay_s`` more latency, ``loss`` of reads retransmitted."""
        self._delay_s, self._loss = delay_s, loss

    def heal(self) -> None:
        """The link as it was. What was held goes through, in order, as TCP delivers it
        once its retransmissions get through; a connection the edge's client gave up on
        meanwhile (NATS pings unanswered) it has closed itself."""
        self._cut, self._delay_s, self._loss = False, 0.0, 0.0

    def _drop_all(self) -> None:
        for task in list(self._pipes):
            task.cancel()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._drop_all)
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
