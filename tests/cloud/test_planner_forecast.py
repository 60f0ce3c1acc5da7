"""The planner's forecasts as the planner uses them: damped trends (a burst is not
extrapolated over the lead time, a ramp still is), the adaptive Kalman filter's noise
estimate, and the band the planner sizes for (the rate's, not one sample's)."""

from __future__ import annotations

import math
import random

import pytest

from cloud.planner_config import PlannerConfig
from cloud.planner_forecast import (
    Forecast,
    Forecaster,
    HoltWinters,
    KalmanTrend,
    ShapeMeter,
    damped_steps,
    make_forecaster,
)

# The benchmark's lead time: a 20 s engine start plus one 2 s sample, in samples.
LEAD = 11


def _planner_kalman() -> KalmanTrend:
    """The forecaster a default planner configuration builds (``kalman``)."""
    config = PlannerConfig(forecaster="kalman")
    kf = make_forecaster(config.forecaster, config.season_periods, config.trend_damping)
    assert isinstance(kf, KalmanTrend) and kf.damping == 0.9
    return kf


def _top_band(forecaster: Forecaster, z: float = 1.0) -> float:
    """What the planner sizes for: the highest upper band over the lead time."""
    return max(forecaster.forecast(h).upper(z) for h in range(1, LEAD + 1))


def test_damped_steps_sum_the_powers_and_stay_bounded() -> None:
    assert damped_steps(1.0, 11) == 11
    assert damped_steps(0.9, 3) == pytest.approx(0.9 + 0.81 + 0.729)
    assert all(damped_steps(0.9, h) < 9 for h in (1, 10, 100))  # phi / (1 - phi)
    assert damped_steps(0.9, 1000) == pytest.approx(9)


@pytest.mark.parametrize("seed", range(5))
def test_a_step_burst_is_not_extrapolated_to_twice_the_step(seed: int) -> None:
    """Arrivals jump from 20 to 40 calls/s (a burst, with counting noise): in the
    samples after the jump, the band over the lead time stays below 80. The undamped
    filter reached 78-95 here: it read the jump as a slope and ran it over 11 samples."""
    rng = random.Random(seed)
    kf = _planner_kalman()
    tops = []
    for t in range(36):
        level = 20.0 if t < 30 else 40.0
        kf.update(level + rng.gauss(0, math.sqrt(level / 2)))
        if t >= 30:
            tops.append(_top_band(kf))
    assert max(tops) < 2 * 40
    assert tops[-1] > 40  # it did follow the step up


def test_a_steady_ramp_is_still_followed() -> None:
    """On a ramp of 0.5 per sample the damped forecast adds the damped trend: well
    above the last value (not a flat forecast), never beyond the ramp itself."""
    rng = random.Random(3)
    kf = _planner_kalman()
    for t in range(100):
        kf.update(10 + 0.5 * t + rng.gauss(0, 2))
    now = 10 + 0.5 * 99
    ahead = kf.forecast(LEAD).mean
    assert ahead - now == pytest.approx(0.5 * damped_steps(0.9, LEAD), abs=1.5)
    assert now + 1.0 < ahead <= now + 0.5 * LEAD
    assert kf.forecast(1).mean == pytest.approx(now + 0.5, abs=1.0)


def test_damped_holt_adds_the_damped_trend() -> None:
    hw = HoltWinters(alpha=0.5, beta=0.3, damping=0.8)
    for t in range(60):
        hw.update(10 + 2 * t)
    # Level 128, trend 2 (estimated undamped); h ahead adds 2 x (0.8 + ... + 0.8^h).
    assert hw.forecast(1).mean == pytest.approx(128 + 2 * 0.8, abs=0.01)
    assert hw.forecast(10).mean == pytest.approx(128 + 2 * damped_steps(0.8, 10), abs=0.05)
    # However far ahead, no more than phi/(1-phi) = 4 trends (undamped: 200 at h=100).
    assert hw.forecast(100).mean == pytest.approx(128 + 2 * 4, abs=0.01)
    with pytest.raises(ValueError, match="damping"):
        HoltWinters(damping=0.0)


def test_the_adaptive_filter_learns_the_observation_noise_not_the_innovations() -> None:
    """Noise of std 5 around a flat 100: r is learnt near 25. Taking each innovation's
    whole square as r (its variance is the state's doubt plus r) learnt 46 here."""
    rng = random.Random(11)
    kf = _planner_kalman()
    for _ in range(3000):
        kf.update(100 + rng.gauss(0, 5))
    assert kf.r == pytest.approx(25, rel=0.2)
    ahead = kf.forecast(1)
    assert ahead.rate_std is not None and ahead.rate_std < ahead.std
    assert ahead.std == pytest.approx(math.sqrt(ahead.rate_std**2 + kf.r))


def test_the_band_is_the_rates_where_the_forecaster_knows_it() -> None:
    assert Forecast(10.0, 3.0, 1.0).upper(2.0) == 12.0  # the rate's std, not the sample's
    assert Forecast(10.0, 3.0).upper(2.0) == 16.0  # no split known: the whole std
    assert Forecast(1.0, 3.0, 2.0).upper(-1.0) == 0.0  # never below zero
    hw = HoltWinters()
    for y in (5.0, 7.0, 6.0, 8.0):
        hw.update(y)
    assert hw.forecast(2).rate_std is None


def test_the_band_is_bounded_by_a_share_of_the_mean() -> None:
    """``band_max_share`` caps the half-width the planner adds; None leaves it as is."""
    wide = Forecast(mean=10.0, std=9.0, rate_std=8.0)
    assert wide.band(1.0) == 8.0 and wide.upper(1.0) == 18.0
    assert wide.band(1.0, 0.5) == 5.0 and wide.upper(1.0, 0.5) == 15.0
    assert Forecast(10.0, 2.0, 1.0).band(1.0, 0.5) == 1.0  # a narrow band is untouched
    falling = Forecast(mean=-2.0, std=3.0, rate_std=3.0)  # a trend run below zero
    assert falling.band(1.0, 0.5) == 0.0 and falling.upper(1.0, 0.5) == 0.0


def test_the_shape_meter_weighs_recent_requests_and_ignores_who_served_them() -> None:
    """Means from the counters' increments, recency-weighted by the half-life; a worker
    that leaves changes nothing, one that restarts counts what it served since."""
    meter = ShapeMeter(half_life_s=10.0)
    meter.seed({"a": (100, 100_000, 1_000)})  # its past (1,000-token prompts) is not seen
    assert meter.means() is None
    meter.observe(0.0, {"a": (110, 102_000, 1_400)})  # 10 requests of 200 in, 40 out
    assert meter.means() == pytest.approx((200.0, 40.0))
    meter.observe(0.0, {"a": (110, 102_000, 1_400), "b": (10, 6_000, 200)})  # b joins
    assert meter.means() == pytest.approx((8_000 / 20, 600 / 20))
    meter.observe(0.0, {"b": (10, 6_000, 200)})  # a drained and left: no request, no change
    assert meter.means() == pytest.approx((400.0, 30.0))
    # One half-life later, 20 requests of 100 in, 10 out: the old 20 weigh half.
    meter.observe(10.0, {"b": (30, 8_000, 400)})
    assert meter.requests == pytest.approx(30.0)
    assert meter.means() == pytest.approx(((8_000 / 2 + 2_000) / 30, (600 / 2 + 200) / 30))
    meter.observe(20.0, {"b": (5, 500, 50)})  # b restarted: its 5 requests are new
    assert meter.requests == pytest.approx(20.0)
    assert meter.means()[0] == pytest.approx((6_000 / 2 + 500) / 20)  # type: ignore[index]
