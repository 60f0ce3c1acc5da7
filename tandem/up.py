"""``tandem up``: the whole mesh on one machine, supervised.

Starts an embedded nats-server, then each role as its own process (as it would
run on its own machine) under one ``Supervisor``, waits until each is healthy,
prints where to connect, and on Ctrl-C or SIGTERM stops everything in reverse
order. Pid files in the run directory let the next ``tandem up`` reap what a
killed one left behind; the supervisor's lifeline makes that rare.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mesh.security import MeshDir
from mesh.security import Role as NodeRole
from mesh.server import EmbeddedNats
from tandem.local import answers, local_nats, serves, tandem_argv
from tandem.supervisor import Child, ChildStartError, Supervisor

_WATCH_S = 0.5


@dataclass(frozen=True)
class Role:
    """One process of the mesh: how to start it and how to tell it is healthy."""

    name: str
    argv: list[str]
    is_ready: Callable[[], bool]
    ready_timeout_s: float = 60.0
    grace_s: float = 15.0


EDGE_ID = "edge-local"
WORKER_ID = "cloud-local-1"


def local_mesh(root: Path, model: str | None = None) -> MeshDir:
    """The single-machine mesh's identities (created on the first ``tandem up``, reused
    after): an operator (``tandem policy``, ``tandem status``), the edge, the worker.
    The edge's grants name ``model`` (default: the catalog's default pair), so
    ``tandem up --model X`` may ask X's workers."""
    mesh = MeshDir(root)
    if not mesh.registry.exists():
        mesh.init()
    else:
        mesh.rerender()  # permissions as this version's code needs them
    identities: tuple[tuple[str, NodeRole], ...] = (
        ("operator", "operator"), (EDGE_ID, "edge"), (WORKER_ID, "worker"),
    )  # fmt: skip
    for name, role in identities:
        mesh.ensure(name, role, models=[model] if role == "edge" and model else None)
    return mesh


def _identity(mesh: MeshDir | None, name: str) -> list[str]:
    return [] if mesh is None else ["--nats-creds", str(mesh.creds(name))]


def edge_role(
    host: str,
    port: int,
    nats_url: str,
    model: str,
    *,
    simulated: bool = False,
    mesh: MeshDir | None = None,
) -> Role:
    """The edge daemon, joined to the mesh; ready when ``/health`` answers."""
    argv = tandem_argv(
        "edge", "serve", "--host", host, "--port", str(port), "--nats-url", nats_url,
        "--model", model, "--node-id", EDGE_ID, *_identity(mesh, EDGE_ID),
        *(["--engine", "sim"] if simulated else []),
    )  # fmt: skip
    return Role("edge", argv, lambda: answers(f"http://{host}:{port}/health"))


def cloud_role(
    nats: EmbeddedNats,
    model: str,
    worker_id: str,
    *,
    simulated: bool = False,
    mesh: MeshDir | None = None,
) -> Role:
    """A cloud worker; ready once it subscribes to its generate subject (~1-2 min on CPU)."""
    argv = tandem_argv(
        "cloud", "serve", "--nats-url", nats.url, "--model", model, "--worker-id", worker_id,
        *_identity(mesh, worker_id), *(["--engine", "sim"] if simulated else []),
    )  # fmt: skip
    return Role("cloud", argv, lambda: serves(nats, worker_id), ready_timeout_s=600.0, grace_s=60.0)


def _watch(children: list[Child], stop_requested: Callable[[], bool]) -> None:
    """Return when a stop is requested; raise ChildStartError if a role exits on its own."""
    while not stop_requested():
        for child in children:
            if not child.alive:
                raise ChildStartError(f"{child.name} exited with {child.returncode}")
        time.sleep(_WATCH_S)


def run_mesh(
    make_roles: Callable[[EmbeddedNats], list[Role]],
    *,
    nats_port: int,
    store_dir: Path,
    run_dir: Path,
    on_ready: Callable[[str], None],
    nats_config: Path | None = None,
) -> None:
    """Run NATS and the roles (made for that NATS) until Ctrl-C or SIGTERM, then stop all.

    Raises ChildStartError when a role fails, AlreadyRunningError when another
    ``tandem up`` owns ``run_dir``.
    """
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        with ExitStack() as stack:
            # Reaps a stale run's nats-server before ours binds its port.
            supervisor = stack.enter_context(Supervisor(run_dir=run_dir))
            nats = stack.enter_context(
                local_nats(supervisor, port=nats_port, store_dir=store_dir, config=nats_config)
            )
            roles = make_roles(nats)
            # All start at once (vLLM's start dominates); stopped in reverse order.
            children = [supervisor.start(r.name, r.argv, grace_s=r.grace_s) for r in roles]
            for role, child in zip(roles, children, strict=True):
                child.wait_ready(role.is_ready, role.ready_timeout_s, poll_s=_WATCH_S)
            on_ready(nats.url)
            _watch(children, lambda: stop_requested)
    except KeyboardInterrupt:
        pass  # the ExitStack has stopped everything
    finally:
        signal.signal(signal.SIGTERM, previous)
