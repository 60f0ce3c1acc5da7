"""Arrival processes: how many sessions are in flight, and when the run stops starting them."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tandem.bench.metrics import SessionRecord
from tandem.bench.runner import _drive


class _Tracker:
    """A session body that only takes time, counting how many run at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0
        self.peak = 0
        self.started: list[Any] = []

    async def play(self, session: Any) -> SessionRecord:
        self.started.append(session)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1
        return SessionRecord(str(session), "test", self.seconds)


def _sessions(n: int) -> list[Any]:
    """Stand-ins for sessions: _drive only hands them to the play function."""
    return list(range(n))


@pytest.mark.timeout(30)
async def test_closed_loop_keeps_concurrency_sessions_in_flight() -> None:
    tracker = _Tracker(0.02)
    records = await _drive(_sessions(9), tracker.play, 3, "closed", None, None, random.Random(0))
    assert len(records) == 9
    assert tracker.peak == 3
    assert tracker.started == list(range(9))  # in order


@pytest.mark.timeout(30)
async def test_duration_stops_starting_new_sessions() -> None:
    tracker = _Tracker(0.2)
    records = await _drive(_sessions(9), tracker.play, 1, "closed", None, 0.3, random.Random(0))
    # starts at 0 s and 0.2 s; the third would start at 0.4 s, past the 0.3 s window
    assert len(records) == 2


@pytest.mark.timeout(30)
async def test_poisson_arrivals_cap_in_flight_sessions() -> None:
    tracker = _Tracker(0.05)
    records = await _drive(_sessions(6), tracker.play, 2, "poisson", 1000.0, None, random.Random(0))
    assert len(records) == 6
    assert tracker.peak <= 2
