"""Saved llama.cpp KV states, so a conversation's next turn evaluates only its new tokens.

A state is keyed by the session id (``x-session-id``) or, for clients that send
none, by an anonymous key; lookups pick the saved state sharing the longest
token prefix with the new prompt, so anonymous multi-turn clients hit too.
Memory is bounded: least recently used states are dropped past the budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def common_prefix_len(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@dataclass(frozen=True)
class SavedState:
    """A llama.cpp context state and the tokens it holds."""

    tokens: np.ndarray
    kv_bytes: bytes

    @property
    def size(self) -> int:
        """Bytes this entry keeps alive."""
        return len(self.kv_bytes) + self.tokens.nbytes


class SessionCache:
    """LRU map of session key to saved KV state, bounded in bytes; thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._entries: OrderedDict[str, SavedState] = OrderedDict()
        self._lock = threading.Lock()
        self._size = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held by all entries."""
        return self._size

    def put(self, key: str, state: SavedState) -> None:
        """Store ``state`` under ``key``, evicting the oldest entries past the budget."""
        if state.size > self._capacity:
            return
        with self._lock:
            self._drop(key)
            self._entries[key] = state
            self._size += state.size
            while self._size > self._capacity:
                self._drop(next(iter(self._entries)))

    def best_match(self, tokens: list[int]) -> tuple[str, SavedState, int] | None:
        """The entry sharing the longest prefix with ``tokens``, with that length."""
        with self._lock:
            best: tuple[str, SavedState, int] | None = None
            for key, state in self._entries.items():
                n = common_prefix_len(state.tokens, tokens)
                if n > 0 and (best is None or n > best[2]):
                    best = (key, state, n)
            if best is not None:
                self._entries.move_to_end(best[0])
            return best

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._size -= old.size
