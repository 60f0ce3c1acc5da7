"""``tandem status``: every node on the mesh with its load, and each pool planner's target."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mesh.connection import DEFAULT_NATS_URL
from tandem.commands.common import NatsCredsOption, NatsTlsCaOption, fail, operator_credentials

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from mesh.connection import MeshCredentials
    from mesh.protocol import NodeHeartbeat, PlannerDecision


async def _listen(
    url: str, listen_s: float, credentials: MeshCredentials
) -> tuple[list[NodeHeartbeat], dict[str, PlannerDecision]]:
    """The nodes heard within ``listen_s``, and each pool's latest planner decision."""
    from mesh import subjects
    from mesh.connection import connect
    from mesh.errors import ProtocolError
    from mesh.heartbeat import FleetView
    from mesh.protocol import PlannerDecision

    decisions: dict[str, PlannerDecision] = {}

    async def on_decision(msg: Msg) -> None:
        try:
            decision = PlannerDecision.from_bytes(msg.data)
        except ProtocolError:
            return
        decisions[decision.pool] = decision

    nc = await connect(url, name="tandem-status", credentials=credentials)
    try:
        fleet = FleetView(nc)
        await fleet.start()
        await nc.subscribe(subjects.all_planner_decisions(), cb=on_decision)
        await asyncio.sleep(listen_s)
        return fleet.nodes(max_age_s=listen_s + 1), decisions
    finally:
        await nc.close()


def status(
    nats_url: Annotated[
        str, typer.Option(help="NATS URL of the mesh.", envvar="TANDEM_NATS_URL")
    ] = DEFAULT_NATS_URL,
    listen_s: Annotated[float, typer.Option(help="Seconds to listen for heartbeats.")] = 1.5,
    nats_creds: NatsCredsOption = None,
    nats_tls_ca: NatsTlsCaOption = None,
) -> None:
    """Show every edge and cloud worker heard on the mesh, with its load.

    Example: tandem status --nats-url nats://10.0.0.5:4222
    """
    from mesh.errors import MeshError

    try:
        credentials = operator_credentials(nats_creds, nats_tls_ca)
        nodes, decisions = asyncio.run(_listen(nats_url, listen_s, credentials))
    except MeshError as exc:
        fail(str(exc))
    table = Table(title=f"Tandem mesh at {nats_url}")
    for column in (
        "node",
        "role",
        "model",
        "running",
        "waiting",
        "KV use",
        "tok/s",
        "prefix hits",
        "state",
        "last beat",
    ):
        table.add_column(column)
    now = time.time()
    for n in nodes:
        load = n.load
        table.add_row(
            n.node_id,
            n.role if n.worker_role in (None, "both") else f"{n.role}/{n.worker_role}",
            n.model,
            str(load.running),
            str(load.waiting),
            f"{load.kv_cache_usage:.0%}",
            f"{load.tokens_per_s:.1f}",
            f"{load.prefix_cache_hit_rate:.0%}" if n.role == "cloud" else "-",
            "draining" if load.draining else "serving",
            f"{max(0.0, now - n.sent_at):.1f}s ago",
        )
    console = Console()
    console.print(table)
    if not nodes:
        typer.echo("no nodes heard: is anything running on this mesh?")
    if decisions:
        console.print(_planner_table(decisions))


def _planner_table(decisions: dict[str, PlannerDecision]) -> Table:
    """Each pool's planner: its target beside what runs, and why."""
    table = Table(title="Planners")
    for column in ("pool", "model", "ready", "provisioned", "target", "forecast rps", "last"):
        table.add_column(column)
    for pool, d in sorted(decisions.items()):
        last = d.action if d.error is None else f"error: {d.error}"
        table.add_row(
            pool, d.model, str(d.ready), str(d.provisioned), str(d.target),
            f"{d.forecast_rps:.2f}", f"{last} ({d.reason})",
        )  # fmt: skip
    return table
