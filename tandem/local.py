"""Tandem's daemons on this machine, as handles over the supervisor: for benches and tests.

Example::

    with Supervisor() as supervisor, local_nats(supervisor) as nats:
        worker = WorkerProcess(nats, "worker-1", supervisor=supervisor)
        worker.start()
        worker.wait_ready()
        with EdgeProcess(supervisor=supervisor, nats_url=nats.url) as edge:
            print(edge.client().models.list())

Every option of a handle is passed as the daemon's ``TANDEM_EDGE_*`` /
``TANDEM_CLOUD_*`` environment variable, as a systemd unit or a pod would set
it. Without ``supervisor`` a handle owns one, closed when the handle stops.
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import httpx
import openai

from mesh import subjects
from mesh.server import EmbeddedNats, free_port
from tandem.supervisor import Child, Supervisor, tandem_argv

__all__ = [
    "EdgeProcess",
    "WorkerProcess",
    "answers",
    "local_nats",
    "serves",
    "tandem_argv",
    "wait_heard",
]


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def serves(nats: EmbeddedNats, worker_id: str) -> bool:
    """Whether cloud worker ``worker_id`` has subscribed to its affinity subject (it is ready):
    ``generate``'s, or ``prefill``'s for a prefill-role worker."""
    return any(
        nats.subscribers(subjects.worker(worker_id, verb)) > 0 for verb in ("generate", "prefill")
    )


@contextmanager
def local_nats(supervisor: Supervisor, **options: Any) -> Iterator[EmbeddedNats]:
    """An embedded nats-server (``EmbeddedNats`` options) covered by ``supervisor``'s lifeline.

    On exit the supervisor's children stop first, while NATS still carries their
    drain, then the server.
    """
    with EmbeddedNats(**options) as nats:
        assert nats.pid is not None
        supervisor.guard("nats-server", nats.pid)
        try:
            yield nats
        finally:
            supervisor.stop_all()


class _Daemon:
    """What edge and worker handles share: a ``tandem <role> serve`` child and its log."""

    _ROLE: ClassVar[str]
    _ENV_PREFIX: ClassVar[str]
    _GRACE_S: ClassVar[float]

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        *,
        supervisor: Supervisor | None,
        cores: str | None,
        log_path: Path | None,
    ) -> None:
        self.name = name
        self.options = options
        self._supervisor = supervisor or Supervisor()
        self._owns_supervisor = supervisor is None
        self._cores = cores
        self._owns_log = log_path is None
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix=f"tandem-{name}-", suffix=".log")[1]
        )
        self.child: Child | None = None

    def _env(self) -> dict[str, str]:
        return {f"{self._ENV_PREFIX}{k.upper()}": str(v) for k, v in self.options.items()}

    def launch(self) -> None:
        """Start the daemon without waiting for it (see ``wait_ready``)."""
        argv = tandem_argv(self._ROLE, "serve")
        if self._cores is not None:  # the whole process, its Python threads too
            argv = ["taskset", "-c", self._cores, *argv]
        self.child = self._supervisor.start(
            self.name, argv, env=self._env(), log_path=self.log_path, grace_s=self._GRACE_S
        )

    def _running(self) -> Child:
        assert self.child is not None, "start the daemon first"
        return self.child

    @property
    def alive(self) -> bool:
        """Whether the daemon is still running."""
        return self.child is not None and self.child.alive

    def log(self) -> str:
        """What the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the daemon and its whole group at once (a crash)."""
        self._running().kill9()
        self._release()

    def terminate(self, grace_s: float | None = None) -> int:
        """SIGTERM (drain), SIGKILL of the group after the grace; return the exit code."""
        code = self._running().terminate(grace_s)
        self._release()
        return code

    def stop(self) -> None:
        """Stop the daemon if it runs and remove a log file this handle created."""
        if self.child is not None:
            self.child.terminate()
        self._release()
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._owns_supervisor:
            self._supervisor.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EdgeProcess(_Daemon):
    """An edge daemon (``tandem edge serve``) on a free port; ready when ``/health`` answers."""

    _ROLE = "edge"
    _ENV_PREFIX = "TANDEM_EDGE_"
    _GRACE_S = 15.0

    def __init__(
        self,
        *,
        supervisor: Supervisor | None = None,
        cores: str | None = None,
        log_path: Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__("edge", options, supervisor=supervisor, cores=cores, log_path=log_path)
        self.port = free_port()
        self._clients: list[openai.OpenAI] = []

    def _env(self) -> dict[str, str]:
        return {**super()._env(), "TANDEM_EDGE_PORT": str(self.port)}

    @property
    def base_url(self) -> str:
        """The HTTP root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Launch and wait until ``/health`` answers."""
        self.launch()
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until ``/health`` answers; ChildStartError with the log if it never does."""
        self._running().wait_ready(lambda: answers(f"{self.base_url}/health"), timeout_s)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An official OpenAI client pointed at this edge (closed when the edge stops)."""
        kwargs.setdefault("api_key", "unused")
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)
        self._clients.append(client)
        return client

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An async official OpenAI client pointed at this edge."""
        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of ``/metrics`` as a flat dict."""
        headers = {}
        if "api_key" in self.options:
            headers["authorization"] = f"Bearer {self.options['api_key']}"
        text = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=5).text
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        return {name: float(value) for name, _, value in (ln.rpartition(" ") for ln in lines)}

    def stop(self) -> None:
        """Close the clients, stop the daemon (SIGTERM, SIGKILL if it lingers)."""
        for client in self._clients:
            client.close()
        super().stop()

    def __enter__(self) -> Self:
        self.start()
        return self


class WorkerProcess(_Daemon):
    """A cloud worker (``tandem cloud serve``) joined to ``nats``; ready once it subscribes."""

    _ROLE = "cloud"
    _ENV_PREFIX = "TANDEM_CLOUD_"
    _GRACE_S = 60.0

    def __init__(
        self,
        nats: EmbeddedNats,
        worker_id: str,
        *,
        supervisor: Supervisor | None = None,
        cores: str | None = None,
        log_path: Path | None = None,
        **options: Any,
    ) -> None:
        # A local worker shares the machine: a small KV cache, and its own free port for
        # /health, /ready and /metrics (two workers would clash on the default 8081).
        options = {
            "kv_cache_gb": 1, "http_port": free_port(), **options,
            "nats_url": nats.url, "worker_id": worker_id,
        }  # fmt: skip
        super().__init__(worker_id, options, supervisor=supervisor, cores=cores, log_path=log_path)
        self.nats = nats
        self.worker_id = worker_id

    @property
    def http_url(self) -> str:
        """Root of the worker's /health, /ready and /metrics, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.options['http_port']}"

    def start(self) -> None:
        """Launch; call ``wait_ready`` before use (vLLM takes a minute or two)."""
        self.launch()

    def wait_ready(self, timeout_s: float = 480.0) -> None:
        """Block until the worker's affinity subject has a subscriber."""
        self._running().wait_ready(lambda: serves(self.nats, self.worker_id), timeout_s, poll_s=0.5)

    def __enter__(self) -> Self:
        self.start()
        self.wait_ready()
        return self


def wait_heard(edge: EdgeProcess, timeout_s: float = 20.0) -> None:
    """Wait until the edge reports its mesh connected, then for a couple of heartbeats."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{edge.base_url}/health", timeout=2).json().get("mesh") != "connected":
        if time.monotonic() > deadline:
            raise TimeoutError(f"edge not connected to the mesh in {timeout_s:.0f} s")
        time.sleep(0.2)
    time.sleep(2.5)  # the edge hears the workers' heartbeats (1 s apart by default)
