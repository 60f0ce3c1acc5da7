"""``tandem mesh``: a hub's identities: create the hub config, add and revoke nodes.

Example::

    tandem mesh init /etc/tandem/mesh
    tandem mesh add-edge edge-kitchen --dir /etc/tandem/mesh   # prints the seed file
    nats-server -c /etc/tandem/mesh/server.conf
    tandem edge serve --nats-url nats://hub:4222 --node-id edge-kitchen \\
        --nats-creds edge-kitchen.nk
    tandem mesh revoke edge-kitchen --dir /etc/tandem/mesh     # cut off within a second
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.connection import DEFAULT_NATS_PORT
from mesh.security import MeshDir, Role
from tandem.commands.common import fail, local_mesh_dir

app = typer.Typer(
    help="The mesh's identities: hub config, nodes, revocation.", no_args_is_help=True
)

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="The mesh directory (default: $TANDEM_HOME/mesh, tandem up's)."),
]


def _mesh(directory: Path | None) -> MeshDir:
    return MeshDir(directory or local_mesh_dir())


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the hub configuration.")],
    host: Annotated[str, typer.Option(help="Interface the hub listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Client port.")] = DEFAULT_NATS_PORT,
    monitor_port: Annotated[int, typer.Option(help="Monitoring port.")] = 8222,
    tls_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A name or address nodes reach the hub by (repeatable): the hub requires "
            "TLS with a certificate for them from a new dev CA."
        ),
    ] = None,
) -> None:
    """Write a hub configuration (nats-server config, users, JetStream) and its first
    operator identity; run the hub with ``nats-server -c DIR/server.conf``."""
    from mesh.errors import MeshError

    mesh = _mesh(directory)
    try:
        mesh.init(host=host, port=port, monitor_port=monitor_port, tls_hosts=tls_host)
        seed = mesh.add("operator", "operator")
    except MeshError as exc:
        fail(str(exc))
    typer.echo(f"hub config: {mesh.server_conf}\noperator identity: {seed}")
    if tls_host:
        typer.echo(f"TLS: nodes trust the hub with --nats-tls-ca {mesh.tls_ca}")


def _add(name: str, role: Role, directory: Path | None) -> None:
    from mesh.errors import MeshError

    mesh = _mesh(directory)
    try:
        seed = mesh.add(name, role)
    except MeshError as exc:
        fail(str(exc))
    reloaded = mesh.reload_hub()
    typer.echo(f"{role} {name}: identity {seed} (give it to that node only)")
    typer.echo("hub reloaded" if reloaded else "hub not running: it admits the node at start")


@app.command("add-edge")
def add_edge(
    name: Annotated[str, typer.Argument(help="The edge's node id.")], directory: DirOption = None
) -> None:
    """Admit an edge: it may ask for generation and verification, follow the policy,
    publish its heartbeats, and read only its own inbox."""
    _add(name, "edge", directory)


@app.command("add-worker")
def add_worker(
    name: Annotated[str, typer.Argument(help="The worker's id.")], directory: DirOption = None
) -> None:
    """Admit a cloud worker: it serves its endpoints and streams replies; never the policy."""
    _add(name, "worker", directory)


@app.command("add-operator")
def add_operator(
    name: Annotated[str, typer.Argument(help="The operator's name.")], directory: DirOption = None
) -> None:
    """Admit an operator: it may write the policy and read status, nothing else."""
    _add(name, "operator", directory)


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The node to cut off.")], directory: DirOption = None
) -> None:
    """Remove a node; a running hub drops its connection at once (config reload)."""
    from mesh.errors import MeshError

    mesh = _mesh(directory)
    try:
        node = mesh.revoke(name)
    except MeshError as exc:
        fail(str(exc))
    reloaded = mesh.reload_hub()
    typer.echo(f"revoked {node.role} {node.name}" + ("; hub reloaded" if reloaded else ""))


@app.command("list")
def list_nodes(directory: DirOption = None) -> None:
    """Every node the hub admits, with its role and public key."""
    from mesh.errors import MeshError

    try:
        nodes = _mesh(directory).nodes()
    except MeshError as exc:
        fail(str(exc))
    for node in nodes:
        typer.echo(f"{node.role:<9} {node.name:<24} {node.public_key}")
