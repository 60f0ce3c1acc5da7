"""The maths of the report: percentiles, per-mode summaries, agreement, the headline.

Pure functions of what the runner recorded; no I/O, so every number can be
checked on known inputs.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tandem.bench.cost import CostModel
from tandem.bench.schema import EnforcedQuality, Headline, ModeResult, Percentiles, Quality
from tandem.bench.workloads import CallCheck


@dataclass(frozen=True)
class CallRecord:
    """One LLM call as the client saw it."""

    session_key: str
    latency_s: float  # includes waiting for the one-at-a-time gate in naive mode
    ttft_s: float | None
    tpot_s: float | None
    route: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    drafted: int = 0
    accepted: int = 0
    tool_choice: str | None = None  # what the call enforced; None: free decoding
    finish_reason: str | None = None


@dataclass
class SessionRecord:
    """One session: its calls, its duration and what went wrong, if anything."""

    key: str
    workload: str
    latency_s: float
    calls: list[CallRecord] = field(default_factory=list)
    checks: list[CallCheck] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class EngineSeconds:
    """Busy seconds of each tier during one mode; None where it could not be read."""

    edge: float | None
    cloud: float | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values_s: Iterable[float | None], scale: float = 1000.0) -> Percentiles:
    """Count, mean and P50/P95/P99 of the values that are known, times ``scale`` (s -> ms)."""
    values = [v * scale for v in values_s if v is not None]
    mean = sum(values) / len(values) if values else None
    return Percentiles(
        count=len(values),
        mean=mean,
        p50=percentile(values, 50),
        p95=percentile(values, 95),
        p99=percentile(values, 99),
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _per_mtok(seconds: float | None, tokens: int) -> float | None:
    return None if seconds is None or tokens <= 0 else seconds * 1e6 / tokens


def quality(
    sessions: Sequence[SessionRecord],
    agreement: tuple[int, float | None],
    enforced: Sequence[SessionRecord] | None = None,
) -> Quality:
    """BFCL validity and accuracy over every checked step, plus the given agreement and,
    when the mode had an enforced pass, that pass's sessions."""
    checks = [c for s in sessions for c in s.checks]
    return Quality(
        bfcl_steps=len(checks),
        tool_call_validity=_ratio(sum(c.valid for c in checks), len(checks)),
        tool_call_accuracy=_ratio(sum(c.correct for c in checks), len(checks)),
        enforced=enforced_quality(enforced) if enforced else None,
        agreement_compared=agreement[0],
        agreement_with_cloud=agreement[1],
    )


def enforced_quality(sessions: Sequence[SessionRecord]) -> EnforcedQuality:
    """BFCL validity and accuracy of a pass that enforced tool choice on its call steps."""
    checks = [c for s in sessions for c in s.checks]
    enforced = [c for s in sessions for c in s.calls if c.tool_choice is not None]
    errors = [s.error for s in sessions if s.error is not None]
    return EnforcedQuality(
        sessions=len(sessions) - len(errors),
        failed_sessions=len(errors),
        error_samples=sorted(set(errors))[:5],
        bfcl_steps=len(checks),
        tool_call_validity=_ratio(sum(c.valid for c in checks), len(checks)),
        tool_call_accuracy=_ratio(sum(c.correct for c in checks), len(checks)),
        cut_by_max_tokens=sum(c.finish_reason == "length" for c in enforced),
        route_mix=dict(sorted(Counter(c.route for c in enforced).items())),
    )


def agreement(pairs: Sequence[tuple[str, str]]) -> tuple[int, float | None]:
    """How many (answer, cloud answer) pairs were compared, and the share that are equal."""
    return len(pairs), _ratio(sum(a == b for a, b in pairs), len(pairs))


def summarize(
    mode: str,
    concurrency: int,
    sessions: Sequence[SessionRecord],
    wall_s: float,
    engine: EngineSeconds,
    cost: CostModel,
    agreement_result: tuple[int, float | None],
    enforced: Sequence[SessionRecord] | None = None,
) -> ModeResult:
    """Every per-mode quantity of the report from the sessions one mode played (and, when
    it had one, its enforced-tool-choice pass: quality only)."""
    calls = [c for s in sessions for c in s.calls]
    prompt = sum(c.prompt_tokens for c in calls)
    completion = sum(c.completion_tokens for c in calls)
    tokens = prompt + completion
    drafted = sum(c.drafted for c in calls)
    by_route: dict[str, list[CallRecord]] = defaultdict(list)
    by_workload: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        by_route[c.route].append(c)
    finished = [s for s in sessions if s.error is None]
    for s in finished:
        by_workload[s.workload].append(s.latency_s)
    errors = [s.error for s in sessions if s.error is not None]
    cost_per_mtok = None
    if engine.edge is not None and engine.cloud is not None:
        cost_per_mtok = cost.usd_per_million_tokens(engine.edge, engine.cloud, tokens)
    return ModeResult(
        mode=mode,
        concurrency=concurrency,
        sessions=len(finished),
        failed_sessions=len(errors),
        requests=len(calls),
        errors=len(errors),
        error_samples=sorted(set(errors))[:5],
        wall_s=wall_s,
        turn_latency_ms=percentiles(c.latency_s for c in calls),
        session_latency_ms=percentiles(s.latency_s for s in finished),
        session_latency_ms_by_workload={w: percentiles(v) for w, v in sorted(by_workload.items())},
        ttft_ms=percentiles(c.ttft_s for c in calls),
        tpot_ms=percentiles(c.tpot_s for c in calls),
        requests_per_s=len(calls) / wall_s,
        output_tokens_per_s=completion / wall_s,
        total_tokens_per_s=tokens / wall_s,
        prompt_tokens=prompt,
        completion_tokens=completion,
        route_mix=dict(sorted(Counter(c.route for c in calls).items())),
        tokens_by_route={
            route: sum(c.prompt_tokens + c.completion_tokens for c in rc)
            for route, rc in sorted(by_route.items())
        },
        speculative_acceptance=(
            sum(c.accepted for c in calls) / drafted
            if "speculative" in by_route and drafted
            else None
        ),
        prefix_cache_hit_rate=_ratio(sum(c.cached_tokens for c in calls), prompt),
        prefix_cache_hit_rate_by_route={
            route: sum(c.cached_tokens for c in rc) / max(1, sum(c.prompt_tokens for c in rc))
            for route, rc in sorted(by_route.items())
        },
        edge_engine_s=engine.edge,
        cloud_engine_s=engine.cloud,
        edge_engine_s_per_mtok=_per_mtok(engine.edge, tokens),
        cloud_engine_s_per_mtok=_per_mtok(engine.cloud, tokens),
        cost_usd_per_mtok=cost_per_mtok,
        quality=quality(sessions, agreement_result, enforced),
    )


def _find(results: Sequence[ModeResult], mode: str, concurrency: int) -> ModeResult | None:
    return next((r for r in results if r.mode == mode and r.concurrency == concurrency), None)


def _change_pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else (new / old - 1.0) * 100.0


def headline(results: Sequence[ModeResult]) -> Headline:
    """The paper's quantities, read at the run's highest concurrency."""
    top = max((r.concurrency for r in results), default=0)
    hybrid, cloud = _find(results, "hybrid", top), _find(results, "cloud", top)
    naive = _find(results, "naive", top)
    bfcl = hybrid.session_latency_ms_by_workload.get("bfcl") if hybrid else None
    return Headline(
        agentic_session_p95_ms=bfcl.p95 if bfcl else None,
        batching_throughput_gain_pct=_change_pct(
            cloud.output_tokens_per_s if cloud else None,
            naive.output_tokens_per_s if naive else None,
        ),
        hybrid_cost_change_pct=_change_pct(
            hybrid.cost_usd_per_mtok if hybrid else None,
            cloud.cost_usd_per_mtok if cloud else None,
        ),
        max_concurrent_sessions=top,
    )
