"""Writing a run down: the JSON report, markdown tables, and PNG plots.

Files in the output directory: ``report.json`` (``BenchReport``), ``report.md``
(the tables), ``latency_cdf.png`` (turn latency CDF per mode),
``throughput.png`` (output tokens/s against concurrency per mode) and
``route_mix.png`` (the share of calls each route served, per mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tandem.bench.schema import BenchReport, ModeResult, Percentiles


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _triple(p: Percentiles) -> str:
    return f"{_num(p.p50)} / {_num(p.p95)} / {_num(p.p99)}"


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{route} {n / total:.0%}" for route, n in counts.items()) or "-"


def latency_table(results: Sequence[ModeResult]) -> str:
    """Latency and throughput per mode and concurrency."""
    rows = [
        "| mode | conc | sessions (failed) | calls | turn ms P50/P95/P99 | session ms "
        "P50/P95/P99 | TTFT ms P50/P95 | TPOT ms P50 | req/s | out tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.mode} | {r.concurrency} | {r.sessions} ({r.failed_sessions}) | {r.requests} "
            f"| {_triple(r.turn_latency_ms)} | {_triple(r.session_latency_ms)} "
            f"| {_num(r.ttft_ms.p50)} / {_num(r.ttft_ms.p95)} | {_num(r.tpot_ms.p50, 1)} "
            f"| {_num(r.requests_per_s, 2)} | {_num(r.output_tokens_per_s, 1)} |"
        )
    return "\n".join(rows)


def cost_table(results: Sequence[ModeResult]) -> str:
    """Routes, caches, engine time, cost and agreement per mode and concurrency."""
    rows = [
        "| mode | conc | route mix | spec. accept | prefix hits | edge s/Mtok | cloud s/Mtok "
        "| $/Mtok | agrees w/ cloud (n) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r.quality
        rows.append(
            f"| {r.mode} | {r.concurrency} | {_shares(r.route_mix)} "
            f"| {_pct(r.speculative_acceptance)} "
            f"| {_pct(r.prefix_cache_hit_rate)} | {_num(r.edge_engine_s_per_mtok)} "
            f"| {_num(r.cloud_engine_s_per_mtok)} | {_num(r.cost_usd_per_mtok, 4)} "
            f"| {_pct(q.agreement_with_cloud)} ({q.agreement_compared}) |"
        )
    return "\n".join(rows)


def tool_call_table(results: Sequence[ModeResult]) -> str:
    """BFCL tool calls per mode: free decoding against enforced tool choice."""
    rows = [
        "| mode | conc | steps | free: valid | free: exact | required: valid "
        "| required: exact | required: cut at max_tokens | required: routes "
        "| required: sessions (failed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q, e = r.quality, r.quality.enforced
        enforced = (
            "| - | - | - | - | - |"
            if e is None
            else f"| {_pct(e.tool_call_validity)} | {_pct(e.tool_call_accuracy)} "
            f"| {e.cut_by_max_tokens} | {_shares(e.route_mix)} "
            f"| {e.sessions} ({e.failed_sessions}) |"
        )
        rows.append(
            f"| {r.mode} | {r.concurrency} | {q.bfcl_steps} | {_pct(q.tool_call_validity)} "
            f"| {_pct(q.tool_call_accuracy)} {enforced}"
        )
    return "\n".join(rows)


def headline_table(report: BenchReport) -> str:
    """This run's numbers beside the product paper's."""
    h = report.headline
    gain = h.batching_throughput_gain_pct
    cost = h.hybrid_cost_change_pct
    return "\n".join(
        [
            "| quantity | paper | this run |",
            "|---|---|---|",
            f"| P95 latency, complex agentic interaction (BFCL session, hybrid) | < 850 ms "
            f"| {_num(h.agentic_session_p95_ms)} ms |",
            f"| throughput from batching over naive sequential | +420% "
            f"| {'-' if gain is None else f'{gain:+.0f}%'} |",
            f"| cost per million tokens, hybrid vs cloud-only | -67% "
            f"| {'-' if cost is None else f'{cost:+.0f}%'} |",
            f"| concurrent sessions | 12,000 | {h.max_concurrent_sessions} |",
        ]
    )


def has_bfcl(results: Sequence[ModeResult]) -> bool:
    """Whether any mode played BFCL steps (the tool-call table has something to say)."""
    return any(r.quality.bfcl_steps or r.quality.enforced for r in results)


def markdown(report: BenchReport) -> str:
    """The whole report as markdown."""
    c = report.config
    parts = [
        f"# tandem bench run, {report.started_at}",
        f"`{c.command}`",
        f"workloads {', '.join(c.workloads)}; {c.sessions} sessions per mode; arrival "
        f"{c.arrival}; max_tokens {c.max_tokens}; temperature {c.temperature}; seed {c.seed}; "
        f"engine {report.machine.engine}; load before/after "
        f"{report.machine.load_before[0]:.2f}/{report.machine.load_after[0]:.2f} "
        f"on {report.machine.cpu_count} CPUs",
        headline_table(report),
        latency_table(report.results),
        cost_table(report.results),
        *([tool_call_table(report.results)] if has_bfcl(report.results) else []),
        *[f"- {note}" for note in report.notes],
    ]
    return "\n\n".join(parts) + "\n"


def plot(report: BenchReport, curves: dict[str, list[float]], out_dir: Path) -> list[Path]:
    """The three PNGs; ``curves`` holds each mode's turn latencies (ms) at top concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    paths = [out_dir / "latency_cdf.png", out_dir / "throughput.png", out_dir / "route_mix.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, values in curves.items():
        ordered = sorted(values)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=mode)
    ax.set_xscale("log")  # latencies span queueing (tens of s) down to cached edge turns
    ax.set(xlabel="turn latency (ms)", ylabel="share of calls", title="Turn latency CDF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r.mode for r in report.results):
        rows = sorted(
            (r.concurrency, r.output_tokens_per_s) for r in report.results if r.mode == mode
        )
        ax.plot([c for c, _ in rows], [t for _, t in rows], marker="o", label=mode)
    ax.set(xlabel="concurrent sessions", ylabel="output tokens/s", title="Throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    top = max(r.concurrency for r in report.results)
    shown = [r for r in report.results if r.concurrency == top]
    routes = sorted({route for r in shown for route in r.route_mix})
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(shown)
    for route in routes:
        shares = [r.route_mix.get(route, 0) / max(1, r.requests) for r in shown]
        ax.bar([r.mode for r in shown], shares, bottom=bottom, label=route)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    ax.set(ylabel="share of calls", title=f"Route mix (concurrency {top})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def write(report: BenchReport, curves: dict[str, list[float]], out_dir: Path) -> list[Path]:
    """Write report.json, report.md and the plots; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return [json_path, md_path, *plot(report, curves, out_dir)]
