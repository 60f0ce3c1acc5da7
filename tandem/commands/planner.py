"""``tandem planner``: run the fleet planner of a pool, and edit its live configuration.

Examples::

    tandem planner run --connector local --engine sim          # sim workers on this machine
    tandem planner run --connector kubernetes --k8s-name tandem-worker --dry-run
    tandem planner config show --pool default
    tandem planner config set -f planner.yaml --pool default

The configuration is stored in NATS KV like the routing policy: ``set`` validates it
(errors name the field) and writes it compare-and-set; a running planner applies it
within milliseconds, and refuses, keeping the last good one, a revision that does not
validate.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from mesh.connection import DEFAULT_NATS_URL
from tandem.commands.common import (
    NatsCredsOption,
    NatsTlsCaOption,
    fail,
    on_mesh,
)
from tandem.supervisor import Child, Supervisor, tandem_argv

app = typer.Typer(help="Size the cloud fleet ahead of demand (the planner) and configure it.")
config_app = typer.Typer(help="Show and set a pool's live planner configuration.")
app.add_typer(config_app, name="config")

T = TypeVar("T")
NatsUrl = Annotated[str, typer.Option(help="NATS URL of the mesh.", envvar="TANDEM_NATS_URL")]
Pool = Annotated[str, typer.Option(help="The pool (one planner and one config per pool).")]


class LocalWorkerProcess:
    """A ``tandem cloud serve`` child of the supervisor, as the local connector sees it."""

    def __init__(self, worker_id: str, child: Child) -> None:
        self.worker_id, self.child = worker_id, child

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.child.alive

    def terminate(self, grace_s: float | None = None) -> int:
        """SIGTERM (the worker drains), SIGKILL after the grace; the exit code."""
        return self.child.terminate(grace_s)


def local_spawner(
    supervisor: Supervisor,
    nats_url: str,
    *,
    engine: str = "sim",
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    grace_s: float = 60.0,
) -> Callable[[str], LocalWorkerProcess]:
    """``spawn(worker_id)`` for ``LocalConnector``: a worker process through ``supervisor``."""

    def spawn(worker_id: str) -> LocalWorkerProcess:
        worker_env = {
            "TANDEM_CLOUD_NATS_URL": nats_url,
            "TANDEM_CLOUD_WORKER_ID": worker_id,
            "TANDEM_CLOUD_ENGINE": engine,
            "TANDEM_CLOUD_KV_CACHE_GB": "1",  # workers share this machine
            "TANDEM_CLOUD_HTTP_PORT": "0",  # several workers here: no fixed HTTP port each
            **(env or {}),
        }
        log = None if log_dir is None else log_dir / f"{worker_id}.log"
        child = supervisor.start(
            worker_id, tandem_argv("cloud", "serve"), env=worker_env, log_path=log, grace_s=grace_s
        )
        return LocalWorkerProcess(worker_id, child)

    return spawn


@app.command()
def run(
    pool: Pool = "default",
    connector: Annotated[
        Literal["local", "kubernetes"], typer.Option(help="Where replicas come from.")
    ] = "local",
    mode: Annotated[
        Literal["predictive", "reactive"], typer.Option(help="Forecast, or queue only.")
    ] = "predictive",
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCredsOption = None,
    nats_tls_ca: NatsTlsCaOption = None,
    engine: Annotated[
        str, typer.Option(help="local: the workers' --engine (sim or real).")
    ] = "sim",
    log_dir: Annotated[Path | None, typer.Option(help="local: where worker logs go.")] = None,
    k8s_name: Annotated[
        str, typer.Option(help="kubernetes: the workload's name.")
    ] = "tandem-worker",
    k8s_namespace: Annotated[str, typer.Option(help="kubernetes: its namespace.")] = "tandem",
    k8s_kind: Annotated[
        Literal["StatefulSet", "Deployment"], typer.Option(help="kubernetes: its kind.")
    ] = "StatefulSet",
    dry_run: Annotated[
        bool, typer.Option(help="kubernetes: print the patches, send none.")
    ] = False,
    profile: Annotated[
        Path | None, typer.Option(help="Latency profile (default: the shipped one).")
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: off).")] = 9400,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
) -> None:
    """Run the planner of POOL until Ctrl-C; refused if another planner holds the pool.

    Example: tandem planner run --connector kubernetes --k8s-name tandem-worker --dry-run
    """
    from cloud.planner import Planner
    from cloud.planner_config import PlannerError
    from cloud.planner_connectors import KubernetesConnector, LocalConnector
    from models.latency import LatencyProfile
    from tandem.commands.common import configure_logging

    configure_logging(log_level)
    cloud_profile = LatencyProfile.load(profile).cloud

    async def main(nc: Any) -> None:
        with Supervisor() as supervisor:
            if connector == "local":
                conn: Any = LocalConnector(
                    local_spawner(supervisor, nats_url, engine=engine, log_dir=log_dir)
                )
            else:
                conn = KubernetesConnector(
                    k8s_name, namespace=k8s_namespace, kind=k8s_kind, dry_run=dry_run
                )
            planner = Planner(nc, pool, conn, profile=cloud_profile, mode=mode)
            await planner.start()
            if metrics_port:
                from prometheus_client import start_http_server

                start_http_server(metrics_port, registry=planner.registry)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await planner.run(stop)
            finally:
                await planner.stop()  # the fleet stays as it is; only the lease goes
                if isinstance(conn, LocalConnector):
                    await conn.close()  # local workers are this process's children

    try:
        on_mesh(nats_url, "tandem-planner", nats_creds, nats_tls_ca, main)
    except PlannerError as exc:
        fail(str(exc))


@config_app.command("show")
def config_show(
    pool: Pool = "default",
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCredsOption = None,
    nats_tls_ca: NatsTlsCaOption = None,
) -> None:
    """Print POOL's stored planner configuration (or the built-in one) as YAML."""
    from cloud.planner_config import PlannerConfig, PlannerStore

    async def work(nc: Any) -> str:
        stored = await (await PlannerStore.open(nc)).config(pool)
        if stored is None:
            built_in = PlannerConfig().to_yaml()
            return f"# pool {pool}: nothing stored; the built-in configuration\n{built_in}"
        state = (
            "valid"
            if stored.config
            else f"INVALID ({stored.error}); planners keep the last good one"
        )
        head = f"# pool {pool}: revision {stored.revision} by {stored.author}, {state}"
        return f"{head}\n{stored.yaml_text}"

    typer.echo(on_mesh(nats_url, "tandem-planner", nats_creds, nats_tls_ca, work), nl=False)


@config_app.command("set")
def config_set(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML of the configuration.")],
    pool: Pool = "default",
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCredsOption = None,
    nats_tls_ca: NatsTlsCaOption = None,
) -> None:
    """Validate FILE and store it as POOL's configuration (compare-and-set).

    Example: tandem planner config set -f planner.yaml --pool default
    """
    from cloud.planner_config import PlannerConfig, PlannerError, PlannerStore

    text = file.read_text(encoding="utf-8")
    try:
        PlannerConfig.from_yaml(text)
    except PlannerError as exc:
        fail(f"{file}: {exc}")

    async def work(nc: Any) -> int:
        store = await PlannerStore.open(nc)
        current = await store.config(pool)
        return await store.set_config(
            pool, text, expect_revision=current.revision if current else 0
        )

    try:
        revision = on_mesh(nats_url, "tandem-planner", nats_creds, nats_tls_ca, work)
    except PlannerError as exc:
        fail(str(exc))
    typer.echo(f"pool {pool}: stored revision {revision}")
