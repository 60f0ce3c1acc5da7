"""The planner's pure parts: forecasting on series with known answers, sizing from the
latency profile, and the decision rules (bounds, cooldowns, drain safety)."""

from __future__ import annotations

import math
import random

import pytest

from cloud.planner import (
    Sizing,
    decide,
    meets_slo,
    replica_capacity_rps,
    step_time_s,
    ttft_quantile_s,
)
from cloud.planner_config import PlannerConfig, PlannerConfigError
from cloud.planner_forecast import HoltWinters, KalmanTrend, RateMeter
from models.latency import EngineProfile, LinearFit

# -- forecasting ---------------------------------------------------------------------------


def test_holt_follows_a_linear_trend_exactly() -> None:
    hw = HoltWinters(alpha=0.5, beta=0.3)
    for t in range(60):
        hw.update(10 + 2 * t)
    # The last value was 128; a straight line continues by 2 per period.
    assert hw.forecast(1).mean == pytest.approx(130, abs=0.01)
    assert hw.forecast(10).mean == pytest.approx(148, abs=0.05)


def test_holt_winters_learns_a_season_and_forecasts_its_peak() -> None:
    season = 12
    shape = [50 + 40 * math.sin(2 * math.pi * i / season) for i in range(season)]
    hw = HoltWinters(alpha=0.3, beta=0.05, gamma=0.5, season=season)
    for t in range(season * 20):
        hw.update(shape[t % season])
    # 240 observations: the next is slot 0 again; 3 ahead is the crest (90).
    for h in range(1, season + 1):
        assert hw.forecast(h).mean == pytest.approx(shape[(h - 1) % season], abs=1.0)
    assert max(range(1, season + 1), key=lambda h: hw.forecast(h).mean) == 4


def test_kalman_tracks_a_noisy_ramp_and_its_band_covers_the_noise() -> None:
    rng = random.Random(7)
    kf = KalmanTrend(q_level=0.1, q_slope=0.0001, r=4.0)
    misses = 0
    for t in range(300):
        truth_ahead = 5 + 0.5 * (t + 5)
        if t >= 50:  # once it has learnt the slope: is the truth 5 ahead inside the band?
            ahead = kf.forecast(5 + 1)
            misses += abs(ahead.mean - truth_ahead) > 2 * ahead.std
        kf.update(5 + 0.5 * t + rng.gauss(0, 2))
    ahead = kf.forecast(5)
    assert ahead.mean == pytest.approx(5 + 0.5 * 304, abs=2.5)
    assert 2.0 <= ahead.std <= 6.0  # at least the observation noise (2), not wildly more
    assert misses <= 0.05 * 250


def test_the_adaptive_kalman_band_scales_with_the_demand() -> None:
    """The same filter on a pool of 0.5 calls/s and one of 500: bands in proportion."""
    stds = []
    for scale in (0.5, 500.0):
        rng = random.Random(3)
        kf = KalmanTrend(q_level=0.25, q_slope=0.01, r=0.01, adaptive=True)
        for _ in range(200):
            kf.update(scale * (1 + 0.1 * rng.gauss(0, 1)))
        ahead = kf.forecast(4)
        assert ahead.mean == pytest.approx(scale, rel=0.15)
        stds.append(ahead.std / scale)
    assert 0.05 <= stds[0] <= 0.4
    assert stds[1] == pytest.approx(stds[0], rel=0.02)  # the first r (0.01) fades at 1/32


def test_kalman_follows_a_step_within_a_few_samples() -> None:
    kf = KalmanTrend()
    for _ in range(30):
        kf.update(10.0)
    for _ in range(6):
        kf.update(50.0)
    assert kf.forecast(1).mean > 45


def test_rate_meter_sums_increments_and_survives_a_restart() -> None:
    meter = RateMeter(window_s=10)
    meter.seed({"a": 100, "b": 0})
    meter.observe(0.0, {"a": 100, "b": 0})
    meter.observe(5.0, {"a": 120, "b": 10})  # 30 arrivals in 5 s
    assert meter.rate() == pytest.approx(6.0)
    meter.observe(10.0, {"a": 5, "b": 20})  # a restarted: its 5 are new
    assert meter.rate() == pytest.approx((30 + 15) / 10)
    # Samples a little more than a window apart (a planner's ticks drift): still a rate.
    late = RateMeter(window_s=5)
    late.observe(0.0, {"a": 0})
    late.observe(5.01, {"a": 10})
    late.observe(10.03, {"a": 30})
    assert late.rate() == pytest.approx(20 / 5.02)


# -- sizing ------------------------------------------------------------------------------


def _profile(c: float = 0.05, d: float = 0.005, slope: float = 0.004) -> EngineProfile:
    fit = LinearFit
    return EngineProfile(
        engine="test line", ttft=fit(intercept=0.0, slope=slope, r2=1, n=2),
        tpot=fit(intercept=c, slope=d, r2=1, n=2), max_batch=128, max_step_tokens=2048,
        kv_bytes_per_token=1,
    )  # fmt: skip


def test_step_time_is_the_fixed_point_of_the_batching_model() -> None:
    p = _profile()
    rps, prompt, out = 0.5, 100, 40
    s = step_time_s(p, rps, prompt, out)
    # s = (c + d·B) / (1 - rho) with B = rps·O·s and rho = rps·P·slope, solved by hand:
    rho = rps * prompt * 0.004
    assert s == pytest.approx(0.05 / (1 - rho - 0.005 * rps * out))
    batch = rps * out * s
    assert s == pytest.approx((0.05 + 0.005 * batch) / (1 - rho))
    assert step_time_s(p, 100.0, prompt, out) == math.inf  # beyond saturation


def test_capacity_is_the_largest_rate_within_the_slo() -> None:
    p = _profile()
    cap = replica_capacity_rps(p, 100, 40, ttft_s=2.0, itl_s=0.25)
    assert meets_slo(p, cap * 0.999, 100, 40, 2.0, 0.25)
    assert not meets_slo(p, cap * 1.01, 100, 40, 2.0, 0.25)
    # Here ITL binds: s = 0.25 exactly at capacity.
    assert step_time_s(p, cap, 100, 40) == pytest.approx(0.25, rel=1e-3)
    # A tighter ITL, a longer prompt, a slower engine: less capacity each.
    assert replica_capacity_rps(p, 100, 40, 2.0, 0.15) < cap
    assert replica_capacity_rps(p, 300, 40, 2.0, 0.25) < cap
    assert replica_capacity_rps(_profile(d=0.01), 100, 40, 2.0, 0.25) < cap
    # A target the engine cannot meet even idle: no capacity at all.
    assert replica_capacity_rps(p, 100, 40, 2.0, 0.04) == 0.0


def test_the_ttft_quantile_follows_the_engines_steps_under_poisson_arrivals() -> None:
    """Alone, a prompt waits for at most one decode step, then its own prefill; as calls
    clump, steps that prefill several prompts stretch the tail far past the mean."""
    p = _profile()
    alone = p.tpot.intercept + 100 * 0.004  # a decode step plus its own prefill
    quiet = ttft_quantile_s(p, 0.01, 100, 40, 0.99)
    assert alone <= quiet <= alone + p.tpot.intercept + 0.01
    busy = [ttft_quantile_s(p, 1.0, 100, 40, q) for q in (0.5, 0.95, 0.99)]
    assert busy == sorted(busy) and busy[2] > 2 * busy[0]
    assert ttft_quantile_s(p, 1.0, 100, 40, 0.99) == busy[2]  # seeded: the same again
    rates = [0.2, 0.5, 1.0, 1.5]
    tails = [ttft_quantile_s(p, r, 100, 40, 0.99) for r in rates]
    assert tails == sorted(tails)
    assert ttft_quantile_s(p, 50.0, 100, 40, 0.99) == math.inf  # beyond saturation


def test_capacity_for_a_ttft_quantile_keeps_that_share_within_the_target() -> None:
    p = _profile()
    mean_bound = replica_capacity_rps(p, 100, 40, 2.0, 0.25)
    p95 = replica_capacity_rps(p, 100, 40, 2.0, 0.25, ttft_quantile=0.95)
    p99 = replica_capacity_rps(p, 100, 40, 2.0, 0.25, ttft_quantile=0.99)
    assert 0 < p99 < p95 <= mean_bound
    assert ttft_quantile_s(p, p99 * 0.99, 100, 40, 0.99) <= 2.0
    assert ttft_quantile_s(p, p99 * 1.05, 100, 40, 0.99) > 2.0
    # The mean-step bound at its own capacity leaves far more than 1% above target.
    assert ttft_quantile_s(p, mean_bound, 100, 40, 0.99) > 2.0


# -- decisions -----------------------------------------------------------------------------


def _sizing(**kw: float) -> Sizing:
    base = dict(
        now=1000.0, provisioned=2, ready=2, starting=0, waiting=0, in_flight=0,
        measured_rps=1.0, forecast_rps=1.0, capacity_rps=1.0, last_up_at=0.0,
    )  # fmt: skip
    base.update(kw)
    return Sizing(**base)  # type: ignore[arg-type]


def _config(**kw: object) -> PlannerConfig:
    data: dict[str, object] = {"utilization_target": 1.0, "scale_down_cooldown_s": 60}
    data.update(kw)
    return PlannerConfig.model_validate(data)


def test_scale_up_to_the_forecast_and_clamp_to_the_maximum() -> None:
    action, desired, target, _ = decide(_config(), _sizing(forecast_rps=4.5))
    assert (action, desired, target) == ("scale_up", 5, 5)
    action, desired, target, _ = decide(
        _config(bounds={"max_replicas": 3}), _sizing(forecast_rps=4.5)
    )
    assert (action, desired, target) == ("scale_up", 5, 3)


def test_the_queue_guard_scales_up_when_the_forecast_was_short() -> None:
    action, _, target, reason = decide(_config(), _sizing(forecast_rps=1, waiting=20))
    # 20 waiting, 4 per ready replica: the 2 ready absorb 8, 12 more need 3 more replicas.
    assert (action, target) == ("scale_up", 5)
    assert "queue" in reason


def test_scale_down_drains_the_whole_excess_at_once_never_below_the_minimum() -> None:
    config = _config(bounds={"min_replicas": 2})
    low = _sizing(provisioned=10, ready=10, forecast_rps=0.1, measured_rps=0.1)
    action, _, target, _ = decide(config, low)
    assert (action, target) == ("scale_down", 2)  # ten to two in one step, not one
    recent = _sizing(provisioned=4, ready=4, forecast_rps=0.1, measured_rps=0.1, last_up_at=980)
    assert decide(config, recent)[0] == "hold"  # 20 s after a scale-up: cooldown (60 s)
    at_min = _sizing(provisioned=2, ready=2, forecast_rps=0.0, measured_rps=0.0)
    assert decide(config, at_min)[0] == "hold"
    # Three provisioned but only two ready (one draining away): never drain to one.
    unsure = _sizing(provisioned=3, ready=2, forecast_rps=0.0, measured_rps=0.0)
    assert decide(config, unsure)[0] == "hold"
    # Six provisioned, four of them ready: only those drain, and two stay ready.
    partly = _sizing(provisioned=6, ready=4, forecast_rps=0.0, measured_rps=0.0)
    assert decide(config, partly)[:3:2] == ("scale_down", 4)
    starting = _sizing(provisioned=4, ready=3, starting=1, forecast_rps=0.0, measured_rps=0.0)
    assert decide(config, starting)[0] == "hold"


def test_no_scale_down_before_the_planner_has_measured_a_window_of_demand() -> None:
    """A planner (re)started on a running fleet reads a rate of 0 before its first
    samples: it holds until it has measured one scale-down window, then acts."""
    config = _config()  # window 60 s
    fresh = dict(provisioned=4, ready=4, forecast_rps=0.0, measured_rps=0.0, last_up_at=-1e9)
    action, _, target, reason = decide(config, _sizing(**fresh, observed_s=1.0))
    assert (action, target) == ("hold", 4) and "measuring demand" in reason
    assert decide(config, _sizing(**fresh, observed_s=61.0))[:3:2] == ("scale_down", 1)
    # Scale-up does not wait: a queue seen in the first second is served at once.
    up = decide(config, _sizing(**fresh, observed_s=1.0, waiting=40))
    assert up[0] == "scale_up"


def test_scale_down_keeps_the_windows_most_and_what_is_in_flight() -> None:
    config = _config(in_flight_per_replica=8, bounds={"max_replicas": 20})
    base = dict(provisioned=10, ready=10, forecast_rps=0.5, measured_rps=0.5)
    # The last window asked for 6 (a burst, now gone): go down to 6, no lower.
    action, desired, target, reason = decide(config, _sizing(**base, recent_desired=6))
    assert (action, desired, target) == ("scale_down", 1, 6) and "window 6" in reason
    # 41 requests in flight need ceil(41 / 8) = 6 replicas, whatever the forecast says.
    assert decide(config, _sizing(**base, in_flight=41))[:3:2] == ("scale_down", 6)
    # The window asked for all ten: hold, the demand may be back within an engine start.
    assert decide(config, _sizing(**base, recent_desired=12))[0] == "hold"
    # Scale-up does not wait for any window: immediate.
    up = _sizing(**{**base, "forecast_rps": 14.5}, recent_desired=3, last_up_at=999)
    assert decide(config, up)[:3:2] == ("scale_up", 15)


def test_the_scale_down_window_defaults_to_the_engine_start() -> None:
    assert PlannerConfig(engine_start_s=45).down_window_s() == 45
    assert PlannerConfig(engine_start_s=45, scale_down_cooldown_s=10).down_window_s() == 10
    just_up = _sizing(provisioned=5, ready=5, forecast_rps=0.0, measured_rps=0.0, last_up_at=970)
    # 30 s after a scale-up: inside a 45 s engine start's window, outside a 10 s one.
    assert decide(PlannerConfig(engine_start_s=45), just_up)[0] == "hold"
    assert decide(PlannerConfig(engine_start_s=45, scale_down_cooldown_s=10), just_up)[0] == (
        "scale_down"
    )


def test_scale_to_zero_only_when_allowed_and_idle() -> None:
    idle = _sizing(provisioned=1, ready=1, forecast_rps=0.0, measured_rps=0.0)
    assert decide(_config(), idle)[0] == "hold"  # min 1
    zero = _config(bounds={"min_replicas": 0, "scale_to_zero": True})
    assert decide(zero, idle)[:3:2] == ("scale_down", 0)
    busy = _sizing(provisioned=1, ready=1, forecast_rps=0.2, measured_rps=0.0)
    assert decide(zero, busy)[0] == "hold"


def test_reactive_mode_sizes_on_in_flight_requests_only() -> None:
    action, desired, _, reason = decide(
        _config(), _sizing(in_flight=30, forecast_rps=100), mode="reactive"
    )
    assert (action, desired) == ("scale_up", 4)  # 30 / 8 per replica
    assert "in flight" in reason


def test_an_invalid_configuration_names_the_field() -> None:
    with pytest.raises(PlannerConfigError) as caught:
        PlannerConfig.from_yaml(
            "bounds: {min_replicas: 5, max_replicas: 2}\nslo: {itl_p95_ms: -1}\n"
        )
    message = str(caught.value)
    assert "slo.itl_p95_ms" in message and "min_replicas 5 > max_replicas 2" in message
    with pytest.raises(PlannerConfigError, match=r"bounds: .*scale_to_zero"):
        PlannerConfig.from_yaml("bounds: {min_replicas: 0}\n")
    with pytest.raises(PlannerConfigError, match="tick_sec"):
        PlannerConfig.from_yaml("tick_sec: 1\n")
    for bad in ("trend_damping: 0\n", "trend_damping: 1.5\n", "scale_down_cooldown_s: -1\n"):
        with pytest.raises(PlannerConfigError, match=bad.split(":")[0]):
            PlannerConfig.from_yaml(bad)
    unset = PlannerConfig.from_yaml("scale_down_cooldown_s: null\ntrend_damping: 1\n")
    assert (unset.scale_down_cooldown_s, unset.trend_damping) == (None, 1.0)
    assert PlannerConfig.from_yaml(PlannerConfig().to_yaml()) == PlannerConfig()
