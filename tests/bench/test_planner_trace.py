"""The planner benchmark's trace and report (the run itself is ``python -m
bench.planner_bench``, documented in docs/benchmarks.md): seeded, diurnal, bursty."""

from __future__ import annotations

import math
import os
import statistics
import time

from bench.planner_bench import (
    CpuMeter,
    SessionPlan,
    _from,
    arrival_rates,
    make_trace,
    markdown,
    parse_args,
    planner_config,
)
from cloud.planner_config import PlannerConfig


def test_the_trace_is_seeded_and_follows_the_diurnal_curve() -> None:
    args = parse_args(["--duration-s", "300", "--trough-sessions", "20", "--peak-sessions", "400"])
    trace = make_trace(args)
    assert [(p.start_s, p.calls) for p in trace] == [(p.start_s, p.calls) for p in make_trace(args)]
    other = make_trace(parse_args(["--duration-s", "300", "--seed", "17"]))
    assert [p.start_s for p in other[:20]] != [p.start_s for p in trace[:20]]
    rates = arrival_rates(trace, args, bin_s=10.0)
    night = statistics.fmean(rates[:3])  # the trough at t=0 ...
    afternoon = statistics.fmean(rates[12:18])  # ... the peak mid-run
    assert afternoon > 4 * night
    assert all(1 <= len(p.calls) <= 6 and len(p.gaps_s) == len(p.calls) - 1 for p in trace)


def test_the_run_opens_on_the_nights_sessions_already_running() -> None:
    """The steady state at t=0: the trough's calls arrive at the trough's rate from the
    first seconds (an empty mesh whose sessions all start at once gets a third of it)."""
    args = parse_args(["--trough-sessions", "200", "--peak-sessions", "2000"])
    mean_gap = args.gap_median_s * math.exp(args.gap_sigma**2 / 2)
    session_s = 4 * args.call_s + 3 * mean_gap
    steady = args.trough_sessions / session_s * 4  # calls/s: 4 calls per session
    first_30_s = statistics.fmean(arrival_rates(make_trace(args), args, bin_s=10.0)[:3])
    assert 0.7 * steady < first_30_s < 1.3 * steady
    assert min(p.start_s for p in make_trace(args)) >= 0


def test_a_session_part_way_through_keeps_its_remaining_calls_and_gaps() -> None:
    plan = SessionPlan(-30.0, [(10, 16), (20, 32), (30, 48)], [10.0, 40.0])
    # calls at -30 and -30 + 2.5 + 10 = -17.5 (both before 0), then at 25.0
    assert _from(plan, 0.0, call_s=2.5) == SessionPlan(25.0, [(30, 48)], [])
    assert _from(plan, -20.0, call_s=2.5) == SessionPlan(-17.5, [(20, 32), (30, 48)], [40.0])
    assert _from(plan, 30.0, call_s=2.5) is None


def test_the_report_shows_cpu_by_role_and_the_load() -> None:
    meter = CpuMeter({"harness": [os.getpid()], "fleet": [], "nats": [None]})
    meter.begin()
    spun = time.process_time()
    while time.process_time() - spun < 0.1:  # CPU in the harness: several clock ticks
        sum(i * i for i in range(10_000))
    cpu = meter.cores()
    assert cpu["harness"] > 0 and cpu["fleet"] == 0 and 0 <= cpu["machine_busy_share"] <= 1
    result = {
        "policy": "static-peak", "slo_attainment": 1.0, "ttft_p95_s": 0.5, "call_p95_s": 1.0,
        "call_p99_s": 1.5, "session_p95_s": 9.0, "session_p99_s": 12.0, "worker_hours": 0.5,
        "utilization": 0.4, "lost": 0, "scale_actions": 0, "cpu_cores": cpu,
        "load_average_before": [0.5, 0.4, 0.3], "load_average_after": [1.5, 0.9, 0.4],
    }  # fmt: skip
    row = markdown([result], parse_args([])).splitlines()[-1]
    assert f"{cpu['harness']:.2f}/0.00/0.00 cores" in row and "0.50 → 1.50" in row


def test_the_planner_config_takes_the_planners_defaults_unless_set() -> None:
    """Unset, the scale-down window is the engine start and the damping the planner's."""
    default = planner_config(parse_args([]), cap=1.0)
    assert default.scale_down_cooldown_s is None and default.down_window_s() == 20.0
    assert default.trend_damping == PlannerConfig().trend_damping
    args = parse_args(["--scale-down-cooldown-s", "7", "--trend-damping", "1"])
    chosen = planner_config(args, cap=1.0)
    assert (chosen.down_window_s(), chosen.trend_damping) == (7.0, 1.0)
