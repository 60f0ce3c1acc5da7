"""``tandem bench``: measure Tandem against the baselines a user would pick instead.

tandem bench run                                  # the mesh of `tandem up`, default modes
tandem bench run --start-mesh --concurrency 1,4   # its own mesh, engines pinned to cores
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tandem.commands.common import fail

app = typer.Typer(
    help="Benchmarks: agentic workloads, every mode side by side.", no_args_is_help=True
)


class _RichProgress:
    """One progress bar per mode, with failed sessions counted in its label."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._failed: dict[str, int] = {}

    def start_mode(self, label: str, sessions: int) -> None:
        """A new bar for a mode."""
        self._tasks[label] = self._progress.add_task(label, total=sessions)
        self._failed[label] = 0

    def session_done(self, label: str, failed: bool) -> None:
        """Advance the mode's bar."""
        self._failed[label] += failed
        note = f"{label} ({self._failed[label]} failed)" if self._failed[label] else label
        self._progress.update(self._tasks[label], advance=1, description=note)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"expected comma-separated integers, got {text!r}")


@app.command()
def run(
    base_url: Annotated[
        str, typer.Option(help="The edge to drive (its HTTP root).", envvar="TANDEM_BENCH_BASE_URL")
    ] = "http://127.0.0.1:8080",
    nats_url: Annotated[
        str,
        typer.Option(
            help="The mesh's NATS, to read cloud engine time ('' to skip).",
            envvar="TANDEM_NATS_URL",
        ),
    ] = "nats://127.0.0.1:4222",
    start_mesh: Annotated[
        bool, typer.Option(help="Start NATS, a vLLM worker and an edge, pinned to separate cores.")
    ] = False,
    edge_cores: Annotated[str, typer.Option(help="With --start-mesh: the edge's cores.")] = "0",
    cloud_cores: Annotated[
        str, typer.Option(help="With --start-mesh: the vLLM worker's cores.")
    ] = "1",
    rtt_ms: Annotated[
        float, typer.Option(help="With --start-mesh: emulated edge-cloud RTT (ms).")
    ] = 0.0,
    model: Annotated[str, typer.Option(help="Model name sent to the edge.")] = "smollm2-135m",
    api_key: Annotated[
        str,
        typer.Option(help="Bearer key of the edge, if it needs one.", envvar="TANDEM_EDGE_API_KEY"),
    ] = "unused",
    workload: Annotated[
        str, typer.Option(help="Comma-separated: bfcl, mtbench, synthetic.")
    ] = "mtbench,bfcl",
    modes: Annotated[
        str, typer.Option(help="Comma-separated: hybrid, cloud, edge, naive, speculative.")
    ] = "hybrid,cloud,edge,naive",
    concurrency: Annotated[
        str, typer.Option(help="Concurrent sessions; a comma list sweeps.")
    ] = "4",
    sessions: Annotated[int, typer.Option(help="Sessions per mode and concurrency.")] = 4,
    duration_s: Annotated[
        float | None, typer.Option(help="Stop starting sessions after this long.")
    ] = None,
    arrival: Annotated[str, typer.Option(help="closed (loop) or poisson.")] = "closed",
    rate: Annotated[float | None, typer.Option(help="Poisson: sessions per second.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of session order, arrivals and synthetic text.")
    ] = 0,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every call.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    bfcl_max_turns: Annotated[int, typer.Option(help="BFCL: user turns played per scenario.")] = 2,
    bfcl_max_tool_chars: Annotated[
        int, typer.Option(help="BFCL: tool JSON budget (chars).")
    ] = 3000,
    synthetic_steps: Annotated[int, typer.Option(help="Synthetic: LLM calls per session.")] = 4,
    synthetic_tool_latency_s: Annotated[
        float, typer.Option(help="Synthetic: tool latency.")
    ] = 0.05,
    synthetic_think_time_s: Annotated[
        float, typer.Option(help="Synthetic: user think time.")
    ] = 0.2,
    synthetic_growth_words: Annotated[
        int, typer.Option(help="Synthetic: words added per step.")
    ] = 60,
    edge_usd_per_hour: Annotated[
        float, typer.Option(help="Cost model: $ per edge engine-hour.")
    ] = 0.005,
    cloud_usd_per_hour: Annotated[
        float, typer.Option(help="Cost model: $ per cloud engine-hour.")
    ] = 0.05,
    out: Annotated[
        Path, typer.Option(help="Directory for report.json, report.md and the PNGs.")
    ] = Path("bench-results"),
) -> None:
    """Drive agentic sessions through every mode in one run; write JSON, markdown and plots.

    Modes: hybrid (the edge's policy), cloud (cloud-only), edge (edge-only),
    naive (cloud-only, one call at a time), speculative (optional).
    Example: tandem bench run --start-mesh --concurrency 1,4 --sessions 4
    """
    from tandem.bench.bfcl import BfclWorkload
    from tandem.bench.cost import CostModel
    from tandem.bench.errors import BenchError
    from tandem.bench.harness import BenchOptions
    from tandem.bench.harness import run as run_bench
    from tandem.bench.local_mesh import MeshLayout
    from tandem.bench.report import headline_table, latency_table, write
    from tandem.bench.runner import RunPlan
    from tandem.bench.synthetic import SyntheticAgent

    options = BenchOptions(
        base_url=base_url,
        nats_url=nats_url or None,
        start_mesh=start_mesh,
        layout=MeshLayout(
            model=model, edge_cores=edge_cores, cloud_cores=cloud_cores, rtt_ms=rtt_ms
        ),
        model=model,
        api_key=api_key,
        workloads=[w.strip() for w in workload.split(",") if w.strip()],
        plan=RunPlan(
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            concurrency=_ints(concurrency),
            arrival=arrival,
            rate_per_s=rate,
            duration_s=duration_s,
            seed=seed,
        ),
        sessions=sessions,
        max_tokens=max_tokens,
        temperature=temperature,
        bfcl=BfclWorkload(max_turns=bfcl_max_turns, max_tool_chars=bfcl_max_tool_chars),
        synthetic=SyntheticAgent(
            steps=synthetic_steps,
            tool_latency_s=synthetic_tool_latency_s,
            think_time_s=synthetic_think_time_s,
            growth_words=synthetic_growth_words,
        ),
        command="tandem bench run "
        + shlex.join(sys.argv[3:] if sys.argv[1:3] == ["bench", "run"] else []),
    )
    # SIGTERM unwinds like Ctrl-C, so a --start-mesh run stops its NATS, worker and edge.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        options.cost = CostModel(
            edge_usd_per_engine_hour=edge_usd_per_hour, cloud_usd_per_engine_hour=cloud_usd_per_hour
        )
        console = Console(stderr=True)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as bar:
            if start_mesh:
                console.print(
                    "starting NATS, a vLLM worker and an edge (the worker takes a minute or two)..."
                )
            report, curves = run_bench(options, _RichProgress(bar), log_dir=out / "logs")
        paths = write(report, curves, out)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    except BenchError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing written", code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(headline_table(report))
    console.print(latency_table(report.results))
    typer.echo("\n".join(str(p) for p in paths))
