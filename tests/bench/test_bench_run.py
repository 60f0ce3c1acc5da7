"""``tandem bench run`` end to end against a real edge (llama.cpp) on a real NATS, and its errors.

The mesh here has no cloud worker, so cloud-routed calls are served by the
edge's fallback and replays never reach a cloud: the report must say so with
nulls exactly where a quantity does not apply, and numbers everywhere else.
Each mode's BFCL session is played a second time with tool_choice 'required'.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.server import EmbeddedNats
from tandem.bench.schema import BenchReport
from tandem.local import EdgeProcess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _null_paths(value: Any, path: str = "") -> Iterator[str]:
    if value is None:
        yield path
    elif isinstance(value, dict):
        for key, sub in value.items():
            yield from _null_paths(sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _null_paths(sub, f"{path}[{i}]")


@pytest.fixture(scope="module")
def bench_edge(nats_server: EmbeddedNats) -> Iterator[EdgeProcess]:
    """One edge (one llama.cpp slot) on the test NATS, for every run of this module."""
    with EdgeProcess(nats_url=nats_server.url, slots=1, max_queue=64) as edge:
        yield edge


def _run(edge: EdgeProcess, nats_url: str, out: Path, *args: str) -> BenchReport:
    proc = _bench(
        "--base-url", edge.base_url, "--nats-url", nats_url, "--out", str(out), *args, timeout=560
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return BenchReport.model_validate_json((out / "report.json").read_text())


@pytest.fixture(scope="module")
def report(
    bench_edge: EdgeProcess, nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BenchReport, Path]:
    """One short run of all four modes on all three workloads."""
    out = tmp_path_factory.mktemp("bench")
    result = _run(
        bench_edge, nats_server.url, out,
        "--workload", "mtbench,bfcl,synthetic",
        "--sessions", "3",
        "--concurrency", "2",
        "--max-tokens", "8",
        "--bfcl-max-turns", "1",
        "--synthetic-steps", "2",
        "--synthetic-think-time-s", "0",
    )  # fmt: skip
    return result, out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_writes_json_markdown_and_plots(report: tuple[BenchReport, Path]) -> None:
    result, out = report
    assert [(r.mode, r.concurrency) for r in result.results] == [
        ("hybrid", 2),
        ("cloud", 2),
        ("edge", 2),
        ("naive", 2),
    ]
    assert result.schema_version == 2 and result.config.enforce_tool_choice
    for name in ("latency_cdf.png", "throughput.png", "route_mix.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text()
    assert "| hybrid | 2 |" in markdown and "+420%" in markdown
    assert "| mode | conc | steps | free: valid | free: exact | required: valid" in markdown


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_field_is_filled_unless_it_cannot_apply(report: tuple[BenchReport, Path]) -> None:
    result, _ = report
    nulls = set(_null_paths(result.model_dump()))
    for i, r in enumerate(result.results):
        # Why each null: nothing took the speculative route; no replay reached a cloud worker.
        assert "speculative" not in r.route_mix and "cloud" not in r.route_mix
        assert f"results[{i}].speculative_acceptance" in nulls
        assert f"results[{i}].quality.agreement_with_cloud" in nulls
    options_not_used = {"config.duration_s", "config.rate_per_s", "config.rtt_ms"}
    expected = options_not_used | {
        f"results[{i}].{field}"
        for i in range(len(result.results))
        for field in ("speculative_acceptance", "quality.agreement_with_cloud")
    }
    assert nulls == expected


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_numbers_are_consistent(report: tuple[BenchReport, Path]) -> None:
    result, _ = report
    by_mode = {r.mode: r for r in result.results}
    for r in result.results:
        assert r.sessions == 3 and r.failed_sessions == 0, r.error_samples
        assert sum(r.route_mix.values()) == r.requests
        assert r.turn_latency_ms.count == r.requests
        for p in (r.turn_latency_ms, r.session_latency_ms, r.ttft_ms):
            assert p.p50 is not None and p.p95 is not None and p.p99 is not None
            assert 0 < p.p50 <= p.p95 <= p.p99
        assert set(r.session_latency_ms_by_workload) == {"bfcl", "mtbench", "synthetic"}
        assert r.completion_tokens > 0 and r.output_tokens_per_s > 0
        assert r.edge_engine_s is not None and r.edge_engine_s > 0
        assert r.edge_engine_s <= r.wall_s  # one llama.cpp slot: busy at most the whole time
        assert r.cloud_engine_s == 0.0  # the mesh has no cloud worker
        assert r.cost_usd_per_mtok is not None and r.cost_usd_per_mtok > 0
        assert r.quality.bfcl_steps > 0
        assert 0 <= (r.quality.tool_call_accuracy or 0) <= (r.quality.tool_call_validity or 0) <= 1
        enforced = r.quality.enforced
        assert enforced is not None
        assert (enforced.sessions, enforced.failed_sessions) == (1, 0), enforced.error_samples
        assert enforced.bfcl_steps == r.quality.bfcl_steps  # the same scenario's steps
        # 8 tokens cannot hold a Hermes call: every enforced step is cut short, invalid.
        assert enforced.cut_by_max_tokens == enforced.bfcl_steps
        assert enforced.tool_call_validity == 0.0
        assert sum(enforced.route_mix.values()) == enforced.bfcl_steps
    # The policy keeps short chats on the edge and sends tools to the cloud (here: fallback).
    assert by_mode["hybrid"].route_mix.keys() == {"edge", "edge-fallback"}
    assert by_mode["edge"].route_mix.keys() == {"edge"}
    assert by_mode["cloud"].route_mix.keys() == {"edge-fallback"}
    routes = {
        r.mode: set(r.quality.enforced.route_mix) for r in result.results if r.quality.enforced
    }
    assert routes == {
        "hybrid": {"edge-fallback"},  # tools: the cloud, here its fallback
        "cloud": {"edge-fallback"},
        "edge": {"edge"},
        "naive": {"edge-fallback"},
    }
    # Off-cloud calls were replayed, but no cloud answered them.
    assert by_mode["edge"].quality.agreement_compared == 0
    h = result.headline
    assert h.max_concurrent_sessions == 2
    assert h.agentic_session_p95_ms == by_mode["hybrid"].session_latency_ms_by_workload["bfcl"].p95


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_enforced_tool_choice_gives_valid_calls_where_they_fit(
    bench_edge: EdgeProcess, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """With room for a call, every enforced step is a valid call of an offered tool."""
    result = _run(
        bench_edge, nats_server.url, tmp_path,
        "--workload", "bfcl",
        "--modes", "edge",
        "--sessions", "1",
        "--concurrency", "1",
        "--max-tokens", "40",
        "--bfcl-max-turns", "1",
    )  # fmt: skip
    (r,) = result.results
    enforced = r.quality.enforced
    assert enforced is not None and enforced.failed_sessions == 0, enforced
    assert enforced.bfcl_steps == r.quality.bfcl_steps > 0
    assert enforced.cut_by_max_tokens == 0
    assert enforced.tool_call_validity == 1.0  # the grammar allows nothing else
    assert 0 <= (enforced.tool_call_accuracy or 0) <= 1
    assert enforced.route_mix == {"edge": enforced.bfcl_steps}
    assert "| edge | 1 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modes", "hybrid,bogus"], "error: unknown mode(s) ['bogus']"),
        (["--workload", "trivia"], "error: unknown workload(s) ['trivia']"),
        (["--rtt-ms", "20"], "error: --rtt-ms needs --start-mesh"),
        (["--arrival", "poisson"], "error: poisson arrival needs --rate"),
        (["--concurrency", "two"], "error: expected comma-separated integers"),
        (["--cloud-usd-per-hour", "-1"], "error: invalid cloud_usd_per_engine_hour"),
    ],
)
def test_bad_options_are_one_clear_line(args: list[str], message: str) -> None:
    proc = _bench(*args, "--base-url", "http://127.0.0.1:1")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_enforced_pass_is_on_unless_switched_off() -> None:
    import inspect

    from tandem.commands.bench import bench_options, run

    unset: dict[str, Any] = {name: None for name in inspect.signature(run).parameters}
    assert bench_options(unset).plan.enforce_tool_choice
    assert not bench_options(unset | {"enforce_tool_choice": False}).plan.enforce_tool_choice
