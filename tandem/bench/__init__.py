"""``tandem bench``: agentic workloads from public data, every mode side by side, one report.

from tandem.bench import BenchOptions, run, write
report, curves = run(BenchOptions(sessions=2))
write(report, curves, Path("bench-results"))
"""

from tandem.bench.bfcl import BfclWorkload
from tandem.bench.cost import CostModel
from tandem.bench.errors import BenchConfigError, BenchError, MeshStartError, WorkloadDataError
from tandem.bench.harness import BenchOptions, run
from tandem.bench.mtbench import MtBenchWorkload
from tandem.bench.report import write
from tandem.bench.runner import MODES, RunPlan, Target
from tandem.bench.schema import BenchReport, ModeResult
from tandem.bench.synthetic import SyntheticAgent, SyntheticWorkload

__all__ = [
    "MODES",
    "BenchConfigError",
    "BenchError",
    "BenchOptions",
    "BenchReport",
    "BfclWorkload",
    "CostModel",
    "MeshStartError",
    "ModeResult",
    "MtBenchWorkload",
    "RunPlan",
    "SyntheticAgent",
    "SyntheticWorkload",
    "Target",
    "WorkloadDataError",
    "run",
    "write",
]
