"""Turning a token stream into text deltas: UTF-8 reassembly and stop sequences.

A token can end in the middle of a multi-byte character, and a stop sequence
can span tokens, so text is released only when it can no longer change:
bytes wait for the rest of their character, and a tail that could still grow
into a stop sequence waits for the next token.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """Releases text in order, holding back any tail that may start a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is now safe to emit. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self._pending += text
        cut = self._first_stop_index()
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._partial_stop_len()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """Release the held-back tail at the end of generation."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _first_stop_index(self) -> int | None:
        hits = [i for s in self._stops if (i := self._pending.find(s)) >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        # Longest suffix of the pending text that is a proper prefix of a stop.
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextAssembler:
    """Token bytes in, finished text out, with stop sequences applied."""

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """True once a stop sequence was produced."""
        return self._stops.stopped

    def push(self, token_bytes: bytes) -> str:
        """Add one token's bytes; return the text that became final."""
        return self._stops.push(self._decoder.decode(token_bytes))

    def finish(self) -> str:
        """End of stream: release everything still held."""
        return self._stops.push(self._decoder.decode(b"", final=True)) + self._stops.flush()
