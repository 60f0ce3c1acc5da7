"""The bench's own mesh: NATS, one vLLM worker and one edge, each engine on its own cores.

The edge runs under ``taskset`` on ``edge_cores`` with one llama.cpp thread;
the worker runs under ``taskset`` on ``cloud_cores`` with vLLM's threads bound
there (its ``cpu_cores`` setting), so the two engines never steal each other's CPU. The
benchmark client stays wherever the caller runs. Each process logs to a file
in ``log_dir`` (the terminal belongs to the progress display).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models.catalog import DEFAULT_PAIR
from tandem.bench.errors import MeshStartError
from tandem.local import EdgeProcess, WorkerProcess, local_nats
from tandem.supervisor import ChildStartError, Supervisor

_EDGE_READY_S = 120.0
_WORKER_READY_S = 900.0


@dataclass(frozen=True)
class LocalMesh:
    """Where the bench's own mesh answers."""

    base_url: str
    nats_url: str


@dataclass(frozen=True)
class MeshLayout:
    """Which cores each engine gets, and the emulated edge-cloud RTT."""

    model: str = DEFAULT_PAIR
    edge_cores: str = "0"
    cloud_cores: str = "1"
    rtt_ms: float = 0.0
    cloud_kv_cache_gb: float = 1.0


@contextmanager
def local_mesh(layout: MeshLayout, log_dir: Path) -> Iterator[LocalMesh]:
    """Start NATS, a pinned vLLM worker and a pinned edge; stop them all on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with Supervisor() as supervisor, local_nats(supervisor) as nats:
        worker = WorkerProcess(
            nats,
            "bench-worker",
            supervisor=supervisor,
            cores=layout.cloud_cores,
            log_path=log_dir / "cloud.log",
            model=layout.model,
            cpu_cores=layout.cloud_cores,  # vLLM's threads bound there too
            kv_cache_gb=layout.cloud_kv_cache_gb,
        )
        edge = EdgeProcess(
            supervisor=supervisor,
            cores=layout.edge_cores,
            log_path=log_dir / "edge.log",
            nats_url=nats.url,
            model=layout.model,
            n_threads=1,
            node_id="bench-edge",
            emulated_rtt_ms=layout.rtt_ms,
        )
        try:
            worker.launch()
            edge.launch()
            edge.wait_ready(_EDGE_READY_S)
            worker.wait_ready(_WORKER_READY_S)
        except ChildStartError as exc:
            raise MeshStartError(str(exc)) from exc
        time.sleep(2.5)  # the edge hears the worker's heartbeats before the first cloud call
        yield LocalMesh(base_url=edge.base_url, nats_url=nats.url)
