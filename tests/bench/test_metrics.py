"""The report's maths on known inputs: percentiles, cost model, per-mode summary, headline."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tandem.bench.cost import CostModel
from tandem.bench.metrics import (
    CallRecord,
    EngineSeconds,
    SessionRecord,
    agreement,
    enforced_quality,
    headline,
    percentile,
    percentiles,
    summarize,
)
from tandem.bench.runner import engine_seconds
from tandem.bench.schema import ModeResult
from tandem.bench.workloads import CallCheck


def test_percentile_interpolates_between_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_matches_numpy_on_seeded_data() -> None:
    rng = random.Random(11)
    values = [rng.expovariate(1.0) for _ in range(1001)]
    for q in (50, 95, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentiles_scale_seconds_to_ms_and_skip_unknowns() -> None:
    p = percentiles([0.1, None, 0.3, 0.2])
    assert p.count == 3
    assert p.mean == pytest.approx(200.0)
    assert p.p50 == pytest.approx(200.0)
    empty = percentiles([])
    assert empty.count == 0 and empty.mean is None and empty.p95 is None


def test_cost_model_prices_engine_hours_per_million_tokens() -> None:
    cost = CostModel(edge_usd_per_engine_hour=0.01, cloud_usd_per_engine_hour=2.0)
    # one edge engine-hour and half a cloud engine-hour: $0.01 + $1.00
    assert cost.usd(3600, 1800) == pytest.approx(1.01)
    assert cost.usd_per_million_tokens(3600, 1800, 2_000_000) == pytest.approx(0.505)
    assert cost.usd_per_million_tokens(3600, 1800, 0) is None
    with pytest.raises(ValueError):
        CostModel(cloud_usd_per_engine_hour=-1)


def _call(route: str, latency: float, **kw: float | str) -> CallRecord:
    fields: dict[str, float | str] = {
        "ttft_s": latency / 2,
        "tpot_s": 0.01,
        "prompt_tokens": 100,
        "cached_tokens": 0,
        "completion_tokens": 10,
    }
    fields.update(kw)
    return CallRecord(session_key="s", latency_s=latency, route=route, **fields)  # type: ignore[arg-type]


def _sessions() -> list[SessionRecord]:
    return [
        SessionRecord(
            "a",
            "bfcl",
            2.0,
            [_call("cloud", 1.0, cached_tokens=50), _call("cloud", 1.0, cached_tokens=100)],
            [CallCheck(True, True), CallCheck(True, False), CallCheck(False, False)],
        ),
        SessionRecord(
            "b",
            "mtbench",
            1.0,
            [_call("speculative", 0.5, drafted=10, accepted=8), _call("edge", 0.5)],
            [CallCheck(False, False)],
        ),
        SessionRecord("c", "mtbench", 9.0, [], [], error="HTTP 400: too long"),
    ]


def test_summary_of_known_sessions() -> None:
    cost = CostModel(edge_usd_per_engine_hour=3.6, cloud_usd_per_engine_hour=36.0)
    r = summarize("hybrid", 2, _sessions(), 4.0, EngineSeconds(edge=2.0, cloud=1.0), cost, (2, 0.5))
    assert (r.sessions, r.failed_sessions, r.requests, r.errors) == (2, 1, 4, 1)
    assert r.error_samples == ["HTTP 400: too long"]
    assert r.route_mix == {"cloud": 2, "edge": 1, "speculative": 1}
    assert r.tokens_by_route == {"cloud": 220, "edge": 110, "speculative": 110}
    assert r.prompt_tokens == 400 and r.completion_tokens == 40
    assert r.requests_per_s == 1.0
    assert r.output_tokens_per_s == 10.0 and r.total_tokens_per_s == 110.0
    assert r.speculative_acceptance == pytest.approx(0.8)
    assert r.prefix_cache_hit_rate == pytest.approx(150 / 400)
    assert r.prefix_cache_hit_rate_by_route == {"cloud": 0.75, "edge": 0.0, "speculative": 0.0}
    assert r.session_latency_ms.count == 2  # the failed session is not a latency sample
    assert r.session_latency_ms_by_workload["bfcl"].p50 == pytest.approx(2000.0)
    assert r.turn_latency_ms.p50 == pytest.approx(750.0)
    # 440 tokens; edge 2 s and cloud 1 s per 440 tokens
    assert r.edge_engine_s_per_mtok == pytest.approx(2.0e6 / 440)
    assert r.cloud_engine_s_per_mtok == pytest.approx(1.0e6 / 440)
    # $0.002 + $0.01 for 440 tokens
    assert r.cost_usd_per_mtok == pytest.approx(0.012e6 / 440)
    q = r.quality
    assert (q.bfcl_steps, q.tool_call_validity, q.tool_call_accuracy) == (4, 0.5, 0.25)
    assert (q.agreement_compared, q.agreement_with_cloud) == (2, 0.5)


def test_enforced_pass_is_judged_apart_from_the_window() -> None:
    """The window's checks stay free decoding's; the pass's own go to quality.enforced."""
    enforced = [
        SessionRecord(
            "a",
            "bfcl",
            3.0,
            [
                _call("cloud", 1.0, tool_choice="required", finish_reason="tool_calls"),
                _call("edge-fallback", 1.0, tool_choice="required", finish_reason="length"),
                _call("cloud", 1.0, finish_reason="stop"),  # the answer in words: free
            ],
            [CallCheck(True, True), CallCheck(False, False)],
        ),
        SessionRecord("d", "bfcl", 1.0, [], [], error="HTTP 400: tool 'f': 'not'"),
    ]
    r = summarize(
        "speculative",
        2,
        _sessions(),
        4.0,
        EngineSeconds(1.0, 1.0),
        CostModel(),
        (0, None),
        enforced,
    )
    q = r.quality
    assert (q.bfcl_steps, q.tool_call_validity, q.tool_call_accuracy) == (4, 0.5, 0.25)
    e = q.enforced
    assert e is not None
    assert (e.sessions, e.failed_sessions, e.error_samples) == (1, 1, ["HTTP 400: tool 'f': 'not'"])
    assert (e.bfcl_steps, e.tool_call_validity, e.tool_call_accuracy) == (2, 0.5, 0.5)
    assert e.cut_by_max_tokens == 1
    assert e.route_mix == {"cloud": 1, "edge-fallback": 1}  # enforced steps only
    # The window's figures ignore the pass: its calls are not the mode's requests.
    assert r.requests == 4 and r.route_mix == {"cloud": 2, "edge": 1, "speculative": 1}
    assert enforced_quality([SessionRecord("x", "bfcl", 1.0)]).tool_call_validity is None


def test_unknown_engine_time_leaves_cost_unknown() -> None:
    r = summarize(
        "edge", 1, _sessions(), 1.0, EngineSeconds(edge=1.0, cloud=None), CostModel(), (0, None)
    )
    assert r.cloud_engine_s_per_mtok is None and r.cost_usd_per_mtok is None
    assert r.edge_engine_s_per_mtok is not None


def test_no_speculative_route_means_no_acceptance() -> None:
    sessions = [SessionRecord("a", "mtbench", 1.0, [_call("edge", 1.0)], [])]
    r = summarize("edge", 1, sessions, 1.0, EngineSeconds(0.5, 0.0), CostModel(), (0, None))
    assert r.speculative_acceptance is None
    assert r.quality.tool_call_validity is None  # no BFCL steps
    assert r.quality.enforced is None  # no enforced pass


def test_agreement_counts_equal_answers() -> None:
    assert agreement([("a", "a"), ("b", "c"), ("d", "d"), ("e", "e")]) == (4, 0.75)
    assert agreement([]) == (0, None)


def test_engine_seconds_are_deltas_over_workers_heard_twice() -> None:
    before = (10.0, {"w1": 5.0, "w2": 1.0, "gone": 3.0})
    after = (12.5, {"w1": 7.0, "w2": 4.0})  # a worker that left takes its time with it
    assert engine_seconds(before, after) == EngineSeconds(edge=2.5, cloud=5.0)
    joined = (12.5, {"w1": 7.0, "w2": 4.0, "w3": 100.0})  # w3's share of the mode is unknown
    assert engine_seconds(before, joined) == EngineSeconds(edge=2.5, cloud=None)
    assert engine_seconds((None, {}), (1.0, {})) == EngineSeconds(edge=None, cloud=0.0)
    assert engine_seconds((1.0, None), (2.0, None)).cloud is None  # no mesh heard
    assert engine_seconds((1.0, {"w": None}), (2.0, {"w": None})).cloud is None


def test_headline_reads_the_highest_concurrency() -> None:
    cost = CostModel(edge_usd_per_engine_hour=1.0, cloud_usd_per_engine_hour=10.0)
    sessions = _sessions()

    def result(mode: str, concurrency: int, wall: float, engine: EngineSeconds) -> ModeResult:
        return summarize(mode, concurrency, sessions, wall, engine, cost, (0, None))

    results = [
        result("naive", 1, 4.0, EngineSeconds(0, 4)),
        result("cloud", 1, 4.0, EngineSeconds(0, 4)),
        result("naive", 4, 8.0, EngineSeconds(0, 4)),
        result("cloud", 4, 2.0, EngineSeconds(0, 4)),  # 4x naive's tokens/s: +300%
        result("hybrid", 4, 2.0, EngineSeconds(2, 1)),  # $(2+10)/3600 against $40/3600
    ]
    h = headline(results)
    assert h.max_concurrent_sessions == 4
    assert h.batching_throughput_gain_pct == pytest.approx(300.0)
    assert h.hybrid_cost_change_pct == pytest.approx((12 / 40 - 1) * 100)
    assert h.agentic_session_p95_ms == pytest.approx(2000.0)
