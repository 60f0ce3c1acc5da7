"""The disaggregation benchmark's pure parts: the trace, goodput, cost, the transfer fit.

No engines run here (``python -m bench.disagg_bench --smoke`` checks the harness end to
end); these pin down what the numbers mean. The token counter is a stand-in (4 characters
a token) so the trace is sized without a tokenizer; the bench sizes it with the pair's.
"""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from bench.disagg_bench import (
    PAPER_COST_RATIO,
    Arrival,
    Outcome,
    Probe,
    calibrate_transfer,
    cost_summary,
    cost_table,
    fleet_configs,
    level_table,
    long_messages,
    make_trace,
    parse_args,
    summarize,
)
from models.latency import LatencyProfile
from tandem.bench.cost import CostModel

DOCS = [
    {"name": f"tool_{i}", "description": "does a thing " * 10, "parameters": {"x": i}}
    for i in range(40)
]


def _chars(messages: list[dict[str, str]]) -> int:
    """A stand-in tokenizer: 4 characters a token."""
    return sum(len(m["content"]) for m in messages) // 4


def _trace(seed: int = 7, rate: float = 2.0, duration: float = 200.0) -> list[Arrival]:
    return make_trace(
        rate, duration, seed=seed, count_tokens=_chars, tool_docs=DOCS, long_share=0.3,
        long_tokens=(800, 1500), sessions=3, tag="t-",
    )  # fmt: skip


def test_the_trace_is_seeded_poisson_with_the_asked_mix() -> None:
    trace = _trace()
    assert trace == _trace()  # same seed, same requests at the same times
    assert trace != _trace(seed=8)
    times = [a.at_s for a in trace]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    # 2 arrivals/s for 200 s: 400 expected, Poisson sd 20.
    assert 340 < len(trace) < 460, len(trace)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.15)
    share = sum(a.kind == "long" for a in trace) / len(trace)
    assert share == pytest.approx(0.3, abs=0.07)


def test_long_prompts_are_fresh_and_sized_and_turns_extend_their_session() -> None:
    trace = _trace()
    longs = [a for a in trace if a.kind == "long"]
    assert all(800 <= a.prompt_tokens <= 1500 + 100 for a in longs)
    assert len({a.messages[0]["content"][:40] for a in longs}) == len(longs)  # no shared start
    assert len({a.session_id for a in longs}) == len(longs)
    turns: dict[str, list[Arrival]] = {}
    for a in trace:
        if a.kind == "turn":
            turns.setdefault(a.session_id, []).append(a)
    counts = [len(t) for t in turns.values()]
    assert max(counts) <= 6 and sum(c < 2 for c in counts) <= 3  # only live ones are cut
    for session in turns.values():
        for before, after in itertools.pairwise(session):
            # The next turn sends the whole conversation so far, then a new question.
            assert after.messages[: len(before.messages)] == before.messages
            assert len(after.messages) == len(before.messages) + 2
            assert after.prompt_tokens > before.prompt_tokens


def test_a_long_prompt_grows_to_its_target_without_overshooting() -> None:
    messages = long_messages("x", 1000, random.Random(1), DOCS, _chars)
    assert 1000 <= _chars(messages) <= 1100
    assert messages[0]["content"].startswith("Request x.")


def _outcome(ttft: float, gap: float, n: int, *, kind: str = "turn", at: float = 0.0,
             error: str | None = None) -> Outcome:  # fmt: skip
    return Outcome(kind, at, ttft_s=ttft, token_times_s=[ttft + i * gap for i in range(n)],
                   error=error)  # fmt: skip


def test_goodput_counts_only_requests_meeting_both_slos() -> None:
    outcomes = [
        _outcome(1.0, 0.05, 10),  # good
        _outcome(1.0, 0.05, 10, at=5.0),  # good
        _outcome(9.0, 0.05, 10),  # first token too late
        _outcome(1.0, 0.20, 10),  # too slow a stream
        _outcome(1.0, 0.05, 10, error="cut: unfinished"),  # never counts
        _outcome(0.5, 0.0, 1, kind="long"),  # one token: only the TTFT applies
    ]
    # A 5 s stall in an otherwise fast stream: mean gap (0.05*8 + 5) / 9 = 0.6 s.
    stalled = _outcome(1.0, 0.05, 10)
    stalled.token_times_s[5:] = [t + 5.0 for t in stalled.token_times_s[5:]]
    outcomes.append(stalled)
    row = summarize(outcomes, window_s=10.0, ttft_slo_s=8.0, itl_slo_s=0.15)
    assert row["requests"] == 7 and row["answered"] == 6
    assert row["good_requests"] == 3
    assert row["goodput_rps"] == pytest.approx(0.3)
    assert row["slo_attainment"] == pytest.approx(3 / 7, abs=1e-3)
    assert row["errors"] == {"cut": 1}
    assert row["good_tokens_per_s"] == pytest.approx((10 + 10 + 1) / 10)
    # 45 gaps: 35 of 50 ms, 9 of 200 ms, the stall; P99 interpolates into the stall.
    assert row["itl_ms"] == {"p50": 50.0, "p99": pytest.approx(2916.0, abs=0.2)}
    assert row["ttft_ms_by_kind"]["long"]["n"] == 1


def test_a_chunk_of_several_tokens_counts_one_gap_then_zeros() -> None:
    o = Outcome("turn", 0.0, ttft_s=1.0, token_times_s=[1.0, 1.1, 1.1, 1.1, 1.3])
    assert o.gaps_s == pytest.approx([0.1, 0.0, 0.0, 0.2])
    assert o.tpot_s == pytest.approx(0.075)


def _row(topology: str, rate: float, goodput: float, tokens: float, workers: int = 2) -> dict:
    return {"topology": topology, "rate_rps": rate, "goodput_rps": goodput,
            "good_tokens_per_s": tokens, "workers": workers}  # fmt: skip


def test_cost_at_equal_goodput_compares_fleets_by_their_best_level() -> None:
    cost = CostModel(cloud_usd_per_engine_hour=1.0)
    rows = [
        _row("monolithic", 0.1, 0.1, 5.0), _row("monolithic", 0.2, 0.15, 10.0),
        _row("monolithic", 0.2, 0.15, 10.0), _row("4:12", 0.1, 0.1, 5.0),
        _row("4:12", 0.2, 0.3, 30.0), _row("4:12", 0.2, 0.1, 10.0),
    ]  # fmt: skip
    by = {c["topology"]: c for c in cost_summary(rows, cost)}
    # Two workers for an hour cost $2; 10 good tokens/s is 36,000 an hour.
    assert by["monolithic"]["usd_per_m_good_tokens"] == pytest.approx(2 / 0.036)
    assert by["4:12"]["best_rate_rps"] == 0.2  # mean goodput over the repetitions: 0.2
    assert by["4:12"]["good_tokens_per_s"] == pytest.approx(20.0)
    assert by["4:12"]["cost_ratio_mono_over_this"] == pytest.approx(2.0)
    assert by["monolithic"]["cost_ratio_mono_over_this"] == pytest.approx(1.0)
    table = cost_table(list(by.values()), "cost")
    assert f"{PAPER_COST_RATIO}x" in table and "| 4:12 | 2 | 0.2 |" in table


def test_the_level_table_has_a_row_per_level() -> None:
    row = summarize([_outcome(1.0, 0.05, 10)], 10.0, 8.0, 0.15)
    row |= {"topology": "monolithic", "workers": 2, "rate_rps": 0.1, "rep": 0}
    table = level_table([row, {**row, "topology": "disaggregated"}], "real")
    lines = table.splitlines()
    assert lines[0] == "**real**" and len(lines) == 6
    assert lines[4].startswith("| disaggregated | 2 | 0.1 | 0 | 1 (1) | 1000.0 / 1000.0 |")


def test_the_transfer_fit_recovers_a_known_hand_over() -> None:
    """Probes made from known lines: compute 50 ms + 3 ms/token on either core, hand-over
    20 ms + 40 us per moved token; the fit gets the hand-over back."""

    def compute(n: int) -> float:
        return 0.05 + 0.003 * n

    probes = []
    for n in (400, 700, 1000, 1300, 1600):
        moved = (n - 2) // 128 * 128
        probes += [
            Probe("monolithic", "mono-0", n, 0, compute(n)),
            Probe("monolithic", "mono-1", n, 0, compute(n)),
            Probe("disaggregated", "decode-1", n, moved,
                  compute(n) + 0.02 + 4e-5 * moved + compute(n - moved)),
        ]  # fmt: skip
    profile = calibrate_transfer(probes, LatencyProfile.default())
    split = profile.disaggregation
    assert split.calibrated and "ExampleConnector" in split.source
    assert split.kv_transfer_fixed_s == pytest.approx(0.02, abs=1e-6)
    assert split.kv_transfer_s_per_token == pytest.approx(4e-5, rel=1e-4)
    assert len(split.transfer_samples) == 5
    assert profile.cloud == LatencyProfile.default().cloud  # the engines stay the same


def test_fleet_splits_must_add_up() -> None:
    configs = dict(fleet_configs(16, ["4:12", "8:8"]))
    assert list(configs) == ["monolithic", "4:12", "8:8"]
    roles = [role for _, role in configs["4:12"]]
    assert roles.count("prefill") == 4 and roles.count("decode") == 12
    with pytest.raises(SystemExit, match="P \\+ D = 16"):
        fleet_configs(16, ["4:10"])


def test_smoke_is_small_and_the_fleet_gets_the_same_load_per_worker() -> None:
    args = parse_args(["--smoke"])
    assert args.rates == [0.15] and args.repeats == 1 and args.fleet_workers == 4
    assert args.fleet_rates == [0.3]
    assert parse_args(["--rates", "0.1", "0.2"]).fleet_rates == [0.8, 1.6]
