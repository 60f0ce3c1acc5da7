"""``tandem bench``: measure Tandem against the baselines a user would pick instead.

tandem bench run                                  # the mesh of `tandem up`, default modes
tandem bench run --start-mesh --concurrency 1,4   # its own mesh, engines pinned to cores
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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

from tandem.commands.common import NatsCredsOption, NatsTlsCaOption, fail, given

if TYPE_CHECKING:
    from tandem.bench.harness import BenchOptions

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


# Where each option of ``run`` goes: the part of ``BenchOptions`` and its field there.
_FIELDS: dict[str, dict[str, str]] = {
    "options": {
        **{name: name for name in ("base_url", "nats_url", "start_mesh", "model", "api_key")},
        **{name: name for name in ("nats_creds", "nats_tls_ca")},
        **{name: name for name in ("sessions", "max_tokens", "temperature")},
        "workload": "workloads",
    },
    "layout": {name: name for name in ("model", "edge_cores", "cloud_cores", "rtt_ms")},
    "plan": {
        **{name: name for name in ("modes", "concurrency", "arrival", "duration_s", "seed")},
        "rate": "rate_per_s",
        "enforce_tool_choice": "enforce_tool_choice",
    },
    "bfcl": {"bfcl_max_turns": "max_turns", "bfcl_max_tool_chars": "max_tool_chars"},
    "synthetic": {
        "synthetic_steps": "steps",
        "synthetic_tool_latency_s": "tool_latency_s",
        "synthetic_think_time_s": "think_time_s",
        "synthetic_growth_words": "growth_words",
    },
    "cost": {
        "edge_usd_per_hour": "edge_usd_per_engine_hour",
        "cloud_usd_per_hour": "cloud_usd_per_engine_hour",
    },
}


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def bench_options(args: dict[str, Any], command: str = "tandem bench run") -> BenchOptions:
    """``BenchOptions`` from ``run``'s arguments, passing on only the given ones (``None``
    is unset), so every default stays where it is defined: ``BenchOptions``, ``RunPlan``,
    ``MeshLayout``, ``BfclWorkload``, ``SyntheticAgent``, ``CostModel``."""
    from tandem.bench.bfcl import BfclWorkload
    from tandem.bench.cost import CostModel
    from tandem.bench.harness import BenchOptions
    from tandem.bench.local_mesh import MeshLayout
    from tandem.bench.runner import RunPlan
    from tandem.bench.synthetic import SyntheticAgent

    a = given(args)
    for name, parse in (("workload", _names), ("modes", _names), ("concurrency", _ints)):
        if name in a:
            a[name] = parse(a[name])
    if a.get("nats_url") == "":
        a["nats_url"] = None  # '' asks to skip reading cloud engine time
    part = {key: {f: a[o] for o, f in fields.items() if o in a} for key, fields in _FIELDS.items()}
    return BenchOptions(
        **part["options"],
        layout=MeshLayout(**part["layout"]),
        plan=RunPlan(**part["plan"]),
        bfcl=BfclWorkload(**part["bfcl"]),
        synthetic=SyntheticAgent(**part["synthetic"]),
        cost=CostModel(**part["cost"]),
        command=command,
    )


@app.command()
def run(
    base_url: Annotated[
        str | None,
        typer.Option(help="The edge to drive (its HTTP root).", envvar="TANDEM_BENCH_BASE_URL"),
    ] = None,
    nats_url: Annotated[
        str | None,
        typer.Option(
            help="The mesh's NATS, to read cloud engine time ('' to skip).",
            envvar="TANDEM_NATS_URL",
        ),
    ] = None,
    nats_creds: NatsCredsOption = None,
    nats_tls_ca: NatsTlsCaOption = None,
    start_mesh: Annotated[
        bool | None,
        typer.Option(help="Start NATS, a vLLM worker and an edge, pinned to separate cores."),
    ] = None,
    edge_cores: Annotated[
        str | None, typer.Option(help="With --start-mesh: the edge's cores.")
    ] = None,
    cloud_cores: Annotated[
        str | None, typer.Option(help="With --start-mesh: the vLLM worker's cores.")
    ] = None,
    rtt_ms: Annotated[
        float | None, typer.Option(help="With --start-mesh: emulated edge-cloud RTT (ms).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name sent to the edge.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="Bearer key of the edge, if it needs one.", envvar="TANDEM_EDGE_API_KEY"),
    ] = None,
    workload: Annotated[
        str | None, typer.Option(help="Comma-separated: bfcl, mtbench, synthetic.")
    ] = None,
    modes: Annotated[
        str | None, typer.Option(help="Comma-separated: hybrid, cloud, edge, naive, speculative.")
    ] = None,
    concurrency: Annotated[
        str | None, typer.Option(help="Concurrent sessions; a comma list sweeps.")
    ] = None,
    sessions: Annotated[int | None, typer.Option(help="Sessions per mode and concurrency.")] = None,
    duration_s: Annotated[
        float | None, typer.Option(help="Stop starting sessions after this long.")
    ] = None,
    arrival: Annotated[str | None, typer.Option(help="closed (loop) or poisson.")] = None,
    rate: Annotated[float | None, typer.Option(help="Poisson: sessions per second.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of session order, arrivals and synthetic text.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens of every call.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (0: greedy).")
    ] = None,
    enforce_tool_choice: Annotated[
        bool | None,
        typer.Option(
            help="BFCL: after each mode's window, play its BFCL sessions again with "
            "tool_choice 'required' on every step that expects a call (quality only)."
        ),
    ] = None,
    bfcl_max_turns: Annotated[
        int | None, typer.Option(help="BFCL: user turns played per scenario.")
    ] = None,
    bfcl_max_tool_chars: Annotated[
        int | None, typer.Option(help="BFCL: tool JSON budget (chars).")
    ] = None,
    synthetic_steps: Annotated[
        int | None, typer.Option(help="Synthetic: LLM calls per session.")
    ] = None,
    synthetic_tool_latency_s: Annotated[
        float | None, typer.Option(help="Synthetic: tool latency.")
    ] = None,
    synthetic_think_time_s: Annotated[
        float | None, typer.Option(help="Synthetic: user think time.")
    ] = None,
    synthetic_growth_words: Annotated[
        int | None, typer.Option(help="Synthetic: words added per step.")
    ] = None,
    edge_usd_per_hour: Annotated[
        float | None, typer.Option(help="Cost model: $ per edge engine-hour.")
    ] = None,
    cloud_usd_per_hour: Annotated[
        float | None, typer.Option(help="Cost model: $ per cloud engine-hour.")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for report.json, report.md and the PNGs.")
    ] = Path("bench-results"),
) -> None:
    """Drive agentic sessions through every mode in one run; write JSON, markdown and plots.

    Modes: hybrid (the edge's policy), cloud (cloud-only), edge (edge-only),
    naive (cloud-only, one call at a time), speculative (optional). BFCL tool-call
    validity and accuracy are reported for free decoding and, unless
    --no-enforce-tool-choice, for enforced tool choice. Unset options take the
    library's defaults (shown in the report's config).
    Example: tandem bench run --start-mesh --concurrency 1,4 --sessions 4
    """
    args = dict(locals())
    from tandem.bench.errors import BenchError
    from tandem.bench.harness import run as run_bench
    from tandem.bench.report import has_bfcl, headline_table, latency_table, tool_call_table, write

    command = "tandem bench run " + shlex.join(
        sys.argv[3:] if sys.argv[1:3] == ["bench", "run"] else []
    )
    # SIGTERM unwinds like Ctrl-C, so a --start-mesh run stops its NATS, worker and edge.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        options = bench_options(args, command)
        console = Console(stderr=True)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as bar:
            if options.start_mesh:
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
    if has_bfcl(report.results):
        console.print(tool_call_table(report.results))
    typer.echo("\n".join(str(p) for p in paths))
