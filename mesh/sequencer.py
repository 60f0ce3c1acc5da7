"""Putting one stream's ``TokenChunk``s back in order: the receiving end of a token stream.

Chunks travel as separate NATS messages, so they can arrive twice or out of order
(a reconnect, a cluster route); ``ChunkSequencer`` restores ``seq`` order, drops
duplicates, and declares a chunk lost (``ProtocolError``) rather than waiting forever.
"""

from __future__ import annotations

import logging

from mesh.errors import ProtocolError
from mesh.protocol import TokenChunk

logger = logging.getLogger(__name__)


class ChunkSequencer:
    """Put one stream's ``TokenChunk``s back in ``seq`` order; drop duplicates; detect loss.

    ``push`` returns the chunks that became deliverable, in order. A chunk still missing
    once ``max_gap`` later chunks have arrived, or when ``finish`` is called, is lost:
    ``ProtocolError``.
    """

    def __init__(self, request_id: str | None = None, *, max_gap: int = 32) -> None:
        self._request_id = request_id
        self._max_gap = max_gap
        self._next_seq = 0
        self._pending: dict[int, TokenChunk] = {}
        self._end_seq: int | None = None

    @property
    def next_seq(self) -> int:
        """The seq of the next chunk to deliver."""
        return self._next_seq

    @property
    def done(self) -> bool:
        """Whether the end chunk has been delivered."""
        return self._end_seq is not None and self._next_seq > self._end_seq

    def missing(self) -> list[int]:
        """Seqs known to be missing (below the highest seq seen)."""
        if not self._pending:
            return []
        return [s for s in range(self._next_seq, max(self._pending)) if s not in self._pending]

    def push(self, chunk: TokenChunk) -> list[TokenChunk]:
        """Accept one chunk in arrival order; return the chunks now deliverable, in order."""
        self._check_request(chunk)
        if chunk.seq < self._next_seq or chunk.seq in self._pending:
            logger.debug("dropping duplicate chunk %s of %s", chunk.seq, chunk.request_id)
            return []
        self._check_end(chunk)
        self._pending[chunk.seq] = chunk
        ready = self._drain()
        if len(self._pending) > self._max_gap:
            raise ProtocolError(
                f"stream {chunk.request_id}: chunk {self._next_seq} lost "
                f"({len(self._pending)} later chunks arrived without it)"
            )
        return ready

    def finish(self) -> None:
        """Declare the stream over; raise ``ProtocolError`` if chunks or the end are missing."""
        if self.done:
            return
        if self._pending:
            raise ProtocolError(f"stream ended with chunks {self.missing()} missing")
        raise ProtocolError(f"stream ended after chunk {self._next_seq - 1} without an end chunk")

    def _check_request(self, chunk: TokenChunk) -> None:
        if self._request_id is None:
            self._request_id = chunk.request_id
        elif chunk.request_id != self._request_id:
            raise ProtocolError(
                f"chunk of request {chunk.request_id} in the stream of {self._request_id}"
            )

    def _check_end(self, chunk: TokenChunk) -> None:
        if chunk.is_end:
            if self._end_seq is not None:
                raise ProtocolError(f"two end chunks ({self._end_seq} and {chunk.seq})")
            if self._pending and max(self._pending) > chunk.seq:
                raise ProtocolError(f"end chunk {chunk.seq} precedes chunk {max(self._pending)}")
            self._end_seq = chunk.seq
        elif self._end_seq is not None and chunk.seq > self._end_seq:
            raise ProtocolError(f"chunk {chunk.seq} after the end chunk {self._end_seq}")

    def _drain(self) -> list[TokenChunk]:
        ready = []
        while self._next_seq in self._pending:
            ready.append(self._pending.pop(self._next_seq))
            self._next_seq += 1
        return ready
