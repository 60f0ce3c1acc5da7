"""One whole ``tandem bench run``: workloads, the target (given or started), modes, the report."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edge.settings import DEFAULT_EDGE_URL
from mesh.connection import DEFAULT_NATS_URL
from models.catalog import DEFAULT_N_CTX, DEFAULT_PAIR
from tandem.bench.bfcl import BfclWorkload
from tandem.bench.cost import CostModel
from tandem.bench.errors import BenchConfigError
from tandem.bench.local_mesh import MeshLayout, local_mesh
from tandem.bench.metrics import headline
from tandem.bench.mtbench import MtBenchWorkload
from tandem.bench.runner import Progress, RunPlan, Target, run_modes
from tandem.bench.schema import BenchConfig, BenchReport, Machine
from tandem.bench.synthetic import SyntheticAgent, SyntheticWorkload
from tandem.bench.workloads import Workload, interleave

WORKLOADS = ("bfcl", "mtbench", "synthetic")


@dataclass
class BenchOptions:
    """Everything ``tandem bench run`` takes; the CLI fills it from its options."""

    base_url: str = DEFAULT_EDGE_URL
    nats_url: str | None = DEFAULT_NATS_URL  # None: read no cloud engine time
    # The mesh identity reading engine time from a secured mesh (--nats-creds); unset:
    # the local mesh's operator when TANDEM_HOME holds one, else anonymous.
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    start_mesh: bool = False
    layout: MeshLayout = field(default_factory=MeshLayout)
    model: str = DEFAULT_PAIR
    api_key: str = "unused"
    workloads: list[str] = field(default_factory=lambda: ["mtbench", "bfcl"])
    plan: RunPlan = field(default_factory=RunPlan)
    sessions: int = 4
    max_tokens: int = 48
    temperature: float = 0.0
    bfcl: BfclWorkload = field(default_factory=BfclWorkload)
    synthetic: SyntheticAgent = field(default_factory=SyntheticAgent)
    cost: CostModel = field(default_factory=CostModel)
    command: str = "tandem bench run"

    def make_workloads(self) -> list[Workload]:
        """The workload objects named in ``workloads``."""
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise BenchConfigError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
        made: dict[str, Workload] = {
            "bfcl": self.bfcl,
            "mtbench": MtBenchWorkload(),
            "synthetic": SyntheticWorkload(self.synthetic),
        }
        return [made[w] for w in self.workloads]

    def check(self) -> None:
        """Raise BenchConfigError on options that cannot work together."""
        self.plan.check()
        self.make_workloads()
        if self.sessions < 1 or self.max_tokens < 1:
            raise BenchConfigError("--sessions and --max-tokens must be at least 1")
        if self.layout.rtt_ms and not self.start_mesh:
            raise BenchConfigError(
                "--rtt-ms needs --start-mesh (an edge started elsewhere keeps its own RTT setting)"
            )


def _notes(options: BenchOptions) -> list[str]:
    notes = [
        "turn = one LLM call; session = one agentic interaction (BFCL scenario, MT-Bench "
        "chat, synthetic agent run)",
        "tokens per million = prompt + completion tokens served; engine seconds = time an "
        "engine had work (edge: llama.cpp slots busy; cloud: vLLM engine busy)",
        f"cost model: edge ${options.cost.edge_usd_per_engine_hour}/engine-hour, cloud "
        f"${options.cost.cloud_usd_per_engine_hour}/engine-hour (illustrative defaults)",
    ]
    if "bfcl" in options.workloads:
        notes.append(
            f"BFCL: scenarios whose needed tools fit {options.bfcl.max_tool_chars} chars of "
            f"tool JSON, first {options.bfcl.max_turns} user turns, tool results cut to "
            f"{options.bfcl.max_result_chars} chars (the default models have "
            f"{DEFAULT_N_CTX}-token contexts)"
        )
        if options.plan.enforce_tool_choice:
            notes.append(
                "BFCL tool calls, free against enforced: free is the measured window (no "
                "tool_choice sent); enforced is a pass after it over the same scenarios, each "
                "step whose ground truth is a call sent with tool_choice 'required' "
                "(constrained decoding; the speculative route sends those to the cloud), not "
                "in the latency or cost figures; both under the same max_tokens"
            )
    return notes


def run(
    options: BenchOptions, progress: Progress | None = None, log_dir: Path | None = None
) -> tuple[BenchReport, dict[str, list[float]]]:
    """Run every mode on the same sessions and build the report (and the CDF curves)."""
    options.check()
    sessions = interleave(options.make_workloads(), options.sessions, options.plan.seed)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    with ExitStack() as stack:
        base_url, nats_url = options.base_url.rstrip("/").removesuffix("/v1"), options.nats_url
        if options.start_mesh:
            logs = log_dir or Path(tempfile.mkdtemp(prefix="tandem-bench-"))
            mesh = stack.enter_context(local_mesh(options.layout, logs))
            base_url, nats_url = mesh.base_url, mesh.nats_url
        credentials = None
        if not options.start_mesh:  # the bench's own mesh is open; another may be secured
            from tandem.commands.common import operator_credentials

            credentials = operator_credentials(options.nats_creds, options.nats_tls_ca)
        target = Target(
            base_url=base_url,
            model=options.model,
            api_key=options.api_key,
            nats_url=nats_url,
            nats_credentials=credentials,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
        )
        results, curves = asyncio.run(
            run_modes(target, sessions, options.plan, options.cost, progress)
        )
    config = BenchConfig(
        command=options.command,
        base_url=base_url,
        nats_url=nats_url,
        started_mesh=options.start_mesh,
        workloads=options.workloads,
        modes=options.plan.modes,
        concurrency=options.plan.concurrency,
        sessions=len(sessions),
        duration_s=options.plan.duration_s,
        arrival=options.plan.arrival,
        rate_per_s=options.plan.rate_per_s,
        seed=options.plan.seed,
        rtt_ms=options.layout.rtt_ms if options.start_mesh else None,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        enforce_tool_choice=options.plan.enforce_tool_choice,
        cost_model=options.cost,
    )
    report = BenchReport(
        started_at=started_at,
        config=config,
        machine=Machine(
            cpu_count=os.cpu_count() or 1,
            load_before=load_before,
            load_after=os.getloadavg(),
            engine="real",
        ),
        results=results,
        headline=headline(results),
        notes=_notes(options),
    )
    return report, curves
