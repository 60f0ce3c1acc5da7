"""Engine busy seconds: overlapping requests count once, idle gaps not at all."""

from __future__ import annotations

from cloud.engine import BusyClock


class _Clock:
    """A hand-advanced clock (the seam BusyClock takes), so the test needs no sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_requests_count_once_and_idle_gaps_not_at_all() -> None:
    clock = _Clock()
    busy = BusyClock(clock)
    with busy.occupied():  # 0..2 s: one request
        clock.now += 1.0
        with busy.occupied():  # 1..3 s: a second one overlaps
            clock.now += 1.0
        assert busy.busy_s == 2.0  # still open: counted up to now
    clock.now += 5.0  # idle
    assert busy.busy_s == 2.0
    with busy.occupied():
        clock.now += 0.5
    assert busy.busy_s == 2.5


def test_a_failed_request_still_closes_its_interval() -> None:
    clock = _Clock()
    busy = BusyClock(clock)
    try:
        with busy.occupied():
            clock.now += 1.5
            raise RuntimeError("vLLM failed")
    except RuntimeError:
        pass
    clock.now += 10.0
    assert busy.busy_s == 1.5
