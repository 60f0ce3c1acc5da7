"""``tandem status``: every node on the mesh with its load."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mesh.connection import DEFAULT_NATS_URL
from tandem.commands.common import NatsCredsOption, NatsTlsCaOption, fail, operator_credentials


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
    from mesh.discovery import snapshot
    from mesh.errors import MeshError

    try:
        credentials = operator_credentials(nats_creds, nats_tls_ca)
        nodes = asyncio.run(snapshot(nats_url, listen_s=listen_s, credentials=credentials))
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
            n.role,
            n.model,
            str(load.running),
            str(load.waiting),
            f"{load.kv_cache_usage:.0%}",
            f"{load.tokens_per_s:.1f}",
            f"{load.prefix_cache_hit_rate:.0%}" if n.role == "cloud" else "-",
            "draining" if load.draining else "serving",
            f"{max(0.0, now - n.sent_at):.1f}s ago",
        )
    Console().print(table)
    if not nodes:
        typer.echo("no nodes heard: is anything running on this mesh?")
