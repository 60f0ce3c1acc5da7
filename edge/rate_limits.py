"""Requests and tokens per minute per API key, on each edge, with OpenAI's headers.

Each limit is a leaky bucket of one minute's capacity that drains continuously (a
key with ``rpm: 60`` gets a request back every second, and may burst 60 at once
after a quiet minute). OpenAI's ``x-ratelimit-*`` headers describe it: the limit,
what remains now, and how long until the bucket is full again (``reset``).

Requests are counted when they are admitted. Tokens (prompt + completion) are known
only when an answer is done, so they are charged then: a request is admitted while
the key's token bucket is not full, and the answer that overflows it makes the next
ones wait. The overshoot is at most the tokens of the requests already in flight.

Limits are per edge: a key used on two edges gets twice its rpm (the fleet-wide
limit is the tenant's cloud-token budget, ``edge.fleet_usage``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.api_keys import ApiKey
from edge.errors import RateLimitError

_WINDOW_S = 60.0


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{int(rest)}s"


@dataclass
class _Bucket:
    """``used`` units of a minute's ``capacity``, draining at capacity/60 per second."""

    capacity: int
    used: float = 0.0
    at: float = 0.0

    def drain(self, now: float) -> None:
        self.used = max(0.0, self.used - (now - self.at) * self.capacity / _WINDOW_S)
        self.at = now

    def remaining(self) -> int:
        return max(0, math.floor(self.capacity - self.used))

    def seconds_until(self, used: float) -> float:
        """Until ``used`` has drained down to the given level."""
        return max(0.0, (self.used - used) * _WINDOW_S / self.capacity)


@dataclass
class _KeyLimits:
    requests: _Bucket | None
    tokens: _Bucket | None


class RateLimiter:
    """The per-key buckets of one edge."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyLimits] = {}

    def _limits(self, key: ApiKey) -> _KeyLimits:
        limits = self._keys.get(key.id)
        if limits is None:
            limits = _KeyLimits(
                _Bucket(key.rpm) if key.rpm else None, _Bucket(key.tpm) if key.tpm else None
            )
            self._keys[key.id] = limits
        return limits

    def admit(self, key: ApiKey) -> dict[str, str]:
        """Count one request; its ``x-ratelimit-*`` headers, or ``RateLimitError``."""
        if key.rpm is None and key.tpm is None:
            return {}
        now = self._clock()
        limits = self._limits(key)
        requests, tokens = limits.requests, limits.tokens
        if tokens is not None:
            tokens.drain(now)
        if requests is not None:
            requests.drain(now)
            if requests.used + 1 > requests.capacity:
                raise self._refusal(key, requests, "requests", requests, tokens)
        if tokens is not None and tokens.used >= tokens.capacity:
            raise self._refusal(key, tokens, "tokens", requests, tokens)
        if requests is not None:
            requests.used += 1
        return self._headers(requests, tokens)

    def charge(self, key: ApiKey | None, tokens: int) -> None:
        """Add a finished answer's prompt and completion tokens to the key's bucket."""
        if key is None or key.tpm is None:
            return
        bucket = self._limits(key).tokens
        assert bucket is not None
        bucket.drain(self._clock())
        bucket.used += tokens

    def _refusal(
        self,
        key: ApiKey,
        full: _Bucket,
        kind: str,
        requests: _Bucket | None,
        tokens: _Bucket | None,
    ) -> RateLimitError:
        """The 429 of a full bucket: retry once one unit has drained."""
        wait = full.seconds_until(full.capacity - 1)
        return RateLimitError(
            f"rate limit reached for key {key.id}: {full.capacity} {kind} per minute; "
            f"retry in {duration(wait)}",
            retry_after_s=wait,
            headers=self._headers(requests, tokens),
            kind=kind,
        )

    @staticmethod
    def _headers(requests: _Bucket | None, tokens: _Bucket | None) -> dict[str, str]:
        headers = {}
        if requests is not None:
            headers["x-ratelimit-limit-requests"] = str(requests.capacity)
            headers["x-ratelimit-remaining-requests"] = str(requests.remaining())
            headers["x-ratelimit-reset-requests"] = duration(requests.seconds_until(0))
        if tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens.capacity)
            headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining())
            headers["x-ratelimit-reset-tokens"] = duration(tokens.seconds_until(0))
        return headers
