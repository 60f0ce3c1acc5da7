"""``tandem up``: the whole mesh on one machine, supervised.

Starts an embedded nats-server, then each role as its own process (as it would
run on its own machine), waits until each is healthy, prints where to connect,
and on Ctrl-C stops everything in reverse order.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mesh import subjects
from mesh.server import EmbeddedNats, stop_process

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """A mesh process exited or did not become healthy in time."""


@dataclass
class Role:
    """One supervised process of the mesh."""

    name: str
    argv: list[str]
    is_ready: Callable[[], bool]
    ready_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch the process (stdout/stderr go to the terminal)."""
        # Own session: Ctrl-C reaches only the supervisor, which stops roles in order.
        self.process = subprocess.Popen(self.argv, start_new_session=True)

    def wait_ready(self) -> None:
        """Block until ``is_ready()``, or raise StartupError."""
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StartupError(f"{self.name} exited with code {self.process.returncode}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise StartupError(f"{self.name} did not become healthy in {self.ready_timeout_s:.0f} s")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (drain), then SIGKILL after ``grace_s``."""
        if self.process is not None:
            stop_process(self.process, grace_s=grace_s, name=self.name, kill_group=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def tandem_argv(*args: str) -> list[str]:
    """argv running a ``tandem`` sub-command with this interpreter."""
    return [sys.executable, "-m", "tandem.cli", *args]


def edge_role(host: str, port: int, nats_url: str, model: str, *, simulated: bool = False) -> Role:
    """The edge daemon, joined to the mesh; ready when ``/health`` answers."""
    argv = tandem_argv(
        "edge",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--nats-url",
        nats_url,
        "--model",
        model,
        *(["--engine", "sim"] if simulated else []),
    )
    return Role("edge", argv, lambda: _answers(f"http://{host}:{port}/health"))


def cloud_role(nats: EmbeddedNats, model: str, worker_id: str, *, simulated: bool = False) -> Role:
    """A cloud worker; ready once it subscribes to its generate subject (~1-2 min on CPU)."""
    argv = tandem_argv(
        "cloud", "serve", "--nats-url", nats.url, "--model", model, "--worker-id", worker_id
    )
    if simulated:
        argv += ["--engine", "sim"]
    subject = subjects.worker(worker_id, "generate")
    return Role("cloud", argv, lambda: nats.subscribers(subject) > 0, ready_timeout_s=600.0)


def _stop_all(roles: list[Role]) -> None:
    """Stop roles in reverse start order (the edge before the workers it uses)."""
    for role in reversed(roles):
        role.stop()


def run_mesh(
    make_roles: Callable[[EmbeddedNats], list[Role]],
    *,
    nats_port: int,
    store_dir: Path,
    on_ready: Callable[[str], None],
) -> None:
    """Run NATS and the roles (made for that NATS) until Ctrl-C or SIGTERM, then stop all."""
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    with ExitStack() as stack:
        nats = stack.enter_context(EmbeddedNats(port=nats_port, store_dir=store_dir))
        started: list[Role] = []
        stack.callback(_stop_all, started)
        for role in make_roles(nats):  # all start at once; vLLM's start dominates
            role.start()
            started.append(role)
        for role in started:
            role.wait_ready()
        on_ready(nats.url)
        try:
            while not stop_requested:
                for role in started:
                    if role.process is not None and role.process.poll() is not None:
                        raise StartupError(f"{role.name} exited with {role.process.returncode}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    signal.signal(signal.SIGTERM, previous)
