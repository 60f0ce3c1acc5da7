"""A fixed pool of engine slots handed out in FIFO order, with a bounded wait queue.

Both edge engines (llama.cpp and the simulated one) serve requests this way: a
request takes a free slot, or waits in line; past ``max_queue`` waiting it gets
429 at once, and closing the pool fails everyone still in line with 503.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from edge.errors import QueueFullError, ServiceUnavailableError

T = TypeVar("T")


class SlotQueue(Generic[T]):
    """Hands out ``slots`` one request at a time, first come first served."""

    def __init__(self, slots: list[T], max_queue: int) -> None:
        self._size = len(slots)
        self._idle = list(slots)
        self._waiters: deque[asyncio.Future[T]] = deque()
        self._max_queue = max_queue
        self._closed = False

    @property
    def running(self) -> int:
        """Slots held by requests now."""
        return self._size - len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests in line for a slot."""
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> T:
        """A free slot, after the requests already waiting; QueueFullError if the line is full."""
        if self._closed:
            raise ServiceUnavailableError("the edge engine is shutting down")
        if self._idle and not self.waiting:
            return self._idle.pop()
        if self.waiting >= self._max_queue:
            raise QueueFullError(
                f"the edge queue is full ({self._max_queue} requests waiting); retry shortly",
                retry_after_s=1,
            )
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over just as the caller gave up
            raise

    def release(self, slot: T) -> None:
        """Give ``slot`` to the next request in line, or back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._idle.append(slot)

    def close(self) -> None:
        """Take no more requests; those in line get 503."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ServiceUnavailableError("the edge engine is shutting down"))
