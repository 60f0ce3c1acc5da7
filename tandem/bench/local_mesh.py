"""The bench's own mesh: NATS, one vLLM worker and one edge, each engine on its own cores.

The edge runs under ``taskset`` on ``edge_cores`` with one llama.cpp thread;
the worker runs under ``taskset`` on ``cloud_cores`` with vLLM's threads bound
there (``--cpu-cores``), so the two engines never steal each other's CPU. The
benchmark client stays wherever the caller runs. Each process logs to a file
in ``log_dir`` (the terminal belongs to the progress display).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh import subjects
from mesh.server import EmbeddedNats, stop_process
from tandem.bench.errors import MeshStartError
from tandem.up import tandem_argv


@dataclass(frozen=True)
class LocalMesh:
    """Where the bench's own mesh answers."""

    base_url: str
    nats_url: str


@dataclass(frozen=True)
class MeshLayout:
    """Which cores each engine gets, and the emulated edge-cloud RTT."""

    model: str = "smollm2-135m"
    edge_cores: str = "0"
    cloud_cores: str = "1"
    rtt_ms: float = 0.0
    cloud_kv_cache_gb: float = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _start(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path
) -> subprocess.Popen[bytes]:
    with (log_dir / f"{name}.log").open("wb") as log:
        # Own session: stopping kills the whole group (vLLM's engine core included).
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )


def _wait(
    name: str,
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout_s: float,
    log_dir: Path,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MeshStartError(
                f"{name} exited with code {process.returncode}; see {log_dir / name}.log"
            )
        if ready():
            return
        time.sleep(0.5)
    raise MeshStartError(f"{name} not ready in {timeout_s:.0f} s; see {log_dir / name}.log")


@contextmanager
def local_mesh(layout: MeshLayout, log_dir: Path) -> Iterator[LocalMesh]:
    """Start NATS, a pinned vLLM worker and a pinned edge; stop them all on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        nats = stack.enter_context(EmbeddedNats())
        worker_id = "bench-worker"
        worker = _start(
            "cloud",
            [
                "taskset",
                "-c",
                layout.cloud_cores,
                *tandem_argv(
                    "cloud",
                    "serve",
                    "--nats-url",
                    nats.url,
                    "--model",
                    layout.model,
                    "--worker-id",
                    worker_id,
                    "--cpu-cores",
                    layout.cloud_cores,
                    "--kv-cache-gb",
                    str(layout.cloud_kv_cache_gb),
                ),
            ],
            {},
            log_dir,
        )
        stack.callback(stop_process, worker, grace_s=30, name="cloud worker", kill_group=True)
        port = _free_port()
        edge = _start(
            "edge",
            [
                "taskset",
                "-c",
                layout.edge_cores,
                *tandem_argv(
                    "edge",
                    "serve",
                    "--port",
                    str(port),
                    "--nats-url",
                    nats.url,
                    "--model",
                    layout.model,
                    "--n-threads",
                    "1",
                    "--node-id",
                    "bench-edge",
                ),
            ],
            {"TANDEM_EDGE_EMULATED_RTT_MS": str(layout.rtt_ms)},
            log_dir,
        )
        stack.callback(stop_process, edge, grace_s=15, name="edge", kill_group=True)
        base_url = f"http://127.0.0.1:{port}"
        _wait("edge", edge, lambda: _answers(f"{base_url}/health"), 120, log_dir)
        generate = subjects.worker(worker_id, "generate")
        _wait("cloud", worker, lambda: nats.subscribers(generate) > 0, 900, log_dir)
        time.sleep(2.5)  # the edge hears the worker's heartbeats before the first cloud call
        yield LocalMesh(base_url=base_url, nats_url=nats.url)
