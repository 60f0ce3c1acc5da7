"""``tandem mesh``: a hub's identities: create the hub config, add and revoke nodes.

Example::

    tandem mesh init /etc/tandem/mesh
    tandem mesh add-edge edge-kitchen --model smollm2-135m --dir /etc/tandem/mesh  # the seed
    nats-server -c /etc/tandem/mesh/server.conf
    tandem edge serve --nats-url nats://hub:4222 --node-id edge-kitchen \\
        --nats-creds edge-kitchen.nk
    tandem mesh revoke edge-kitchen --dir /etc/tandem/mesh     # cut off within a second

An edge device may run its own nats-server, a leaf node of the hub (``mesh.leaf``):
add-edge writes its config too, ``DIR/leaf/NAME.conf`` (``--hub-url`` names the hub's
leaf port); on the device ``nats-server -c NAME.conf`` and the edge points at it with
``--nats-url nats://127.0.0.1:4222`` and the same ``--nats-creds``.
    tandem mesh issue-cert edge-kitchen --host kitchen.lan --dir /etc/tandem/mesh  # HTTPS
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mesh.connection import DEFAULT_NATS_PORT
from mesh.leaf import DEFAULT_LEAF_PORT
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
    leaf_port: Annotated[
        int, typer.Option(help="Where edge devices' own nats-servers connect as leaf nodes.")
    ] = DEFAULT_LEAF_PORT,
    tls_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A name or address nodes reach the hub by (repeatable): the hub requires "
            "TLS with a certificate for them from a new dev CA (with --tls-cert: the "
            "names the edges' leaves reach the hub by)."
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="Your own CA (PEM), with --tls-cert and --tls-key.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Your own hub certificate (PEM), signed by --tls-ca.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The private key of --tls-cert (PEM, unencrypted).")
    ] = None,
) -> None:
    """Write a hub configuration (nats-server config, users, JetStream) and its first
    operator identity; run the hub with ``nats-server -c DIR/server.conf``."""
    from mesh.errors import MeshError

    given = [f for f in (tls_ca, tls_cert, tls_key) if f is not None]
    if given and len(given) != 3:
        fail("give --tls-ca, --tls-cert and --tls-key together (your own TLS files)")
    tls_files = (given[0], given[1], given[2]) if given else None
    mesh = _mesh(directory)
    try:
        mesh.init(
            host=host, port=port, monitor_port=monitor_port, tls_hosts=tls_host,
            leaf_port=leaf_port, tls_files=tls_files,
        )  # fmt: skip
        seed = mesh.add("operator", "operator")
    except MeshError as exc:
        fail(str(exc))
    typer.echo(f"hub config: {mesh.server_conf}\noperator identity: {seed}")
    if tls_host or given:
        typer.echo(f"TLS: nodes trust the hub with --nats-tls-ca {mesh.tls_ca}")


def _add(name: str, role: Role, directory: Path | None, **options: Any) -> MeshDir:
    from mesh.errors import MeshError

    mesh = _mesh(directory)
    try:
        seed = mesh.add(name, role, **options)
    except MeshError as exc:
        fail(str(exc))
    reloaded = mesh.reload_hub()
    typer.echo(f"{role} {name}: identity {seed} (give it to that node only)")
    typer.echo("hub reloaded" if reloaded else "hub not running: it admits the node at start")
    return mesh


@app.command("add-edge")
def add_edge(
    name: Annotated[str, typer.Argument(help="The edge's node id.")],
    directory: DirOption = None,
    hub_url: Annotated[
        str | None,
        typer.Option(
            help="Where the edge's own leaf node reaches the hub's leaf port, e.g. "
            "nats-leaf://hub.example:7422 (default: from tandem mesh init)."
        ),
    ] = None,
    local_port: Annotated[
        int, typer.Option(help="The loopback port of the edge's own leaf node.")
    ] = DEFAULT_NATS_PORT,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="A catalog model pair the edge serves (repeatable): the only models it may "
            "ask the cloud for (default: the catalog's default pair)."
        ),
    ] = None,
) -> None:
    """Admit an edge: it may ask for generation and verification of its models, follow
    the policy, publish its heartbeats, and read only its own inbox. Also writes
    DIR/leaf/NAME.conf, the edge device's own nats-server as a leaf node of the hub (it
    holds the seed too). Example: tandem mesh add-edge kitchen --model smollm2-135m"""
    mesh = _add(
        name, "edge", directory, hub_url=hub_url, local_port=local_port, models=model or None
    )
    typer.echo(
        f"leaf node: {mesh.leaf_conf(name)} (on the device: nats-server -c ...; then "
        f"--nats-url nats://127.0.0.1:{local_port} with the same identity)"
    )


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


@app.command("add-planner")
def add_planner(
    name: Annotated[str, typer.Argument(help="The planner's name.")], directory: DirOption = None
) -> None:
    """Admit a planner: it follows its configuration, holds its pool's lease, publishes
    its decisions and reads heartbeats (tandem planner run --nats-creds ...)."""
    _add(name, "planner", directory)


@app.command("issue-cert")
def issue_cert(
    name: Annotated[str, typer.Argument(help="The edge's node id.")],
    host: Annotated[
        list[str],
        typer.Option(help="A name or address clients reach the edge's API by (repeatable)."),
    ],
    directory: DirOption = None,
) -> None:
    """Issue an HTTPS certificate for edge NAME's OpenAI API, signed by the mesh's dev CA
    (made by tandem mesh init --tls-host); its clients trust DIR/tls/ca.pem. Re-run it
    to renew. Example: tandem mesh issue-cert kitchen --host kitchen.lan --host 10.0.0.7"""
    from mesh import subjects
    from mesh.errors import MeshError
    from mesh.tls import issue_cert as issue

    mesh = _mesh(directory)
    try:
        files = issue(mesh.tls_ca.parent, f"{subjects.token(name)}-http", host)
    except MeshError as exc:
        fail(str(exc))
    typer.echo(f"certificate: {files.cert}\nkey: {files.key} (give it to that edge only)")
    typer.echo(f"serve: tandem edge serve --tls-certfile {files.cert} --tls-keyfile {files.key}")
    typer.echo(f"clients trust: {mesh.tls_ca}")


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The node to cut off.")],
    directory: DirOption = None,
    hub_url: Annotated[
        str | None,
        typer.Option(help="The hub's client URL, to cut a leaf link (default: server.conf's)."),
    ] = None,
    kick_all_leaves: Annotated[
        bool,
        typer.Option(
            help="Close every leaf link, not just the edge's (a device that renamed its leaf); "
            "the others relink within a second."
        ),
    ] = False,
) -> None:
    """Remove a node; a running hub drops its connection at once (config reload), and a
    revoked edge's leaf link is closed (a reload does not re-check leaf links)."""
    from mesh.errors import MeshError

    mesh = _mesh(directory)
    try:
        node = mesh.revoke(name)
    except MeshError as exc:
        fail(str(exc))
    reloaded = mesh.reload_hub()
    typer.echo(f"revoked {node.role} {node.name}" + ("; hub reloaded" if reloaded else ""))
    if not reloaded:
        typer.echo("hub not running: it refuses the node when it starts")
        return
    if node.role != "edge":
        return
    _cut_leaf(mesh, node.name, hub_url, kick_all_leaves)


@app.command("cut-leaf")
def cut_leaf(
    name: Annotated[str, typer.Argument(help="The revoked edge whose leaf link to close.")],
    hub_url: Annotated[str, typer.Option(help="The hub's client URL (any server of it).")],
    directory: DirOption = None,
    kick_all_leaves: Annotated[
        bool, typer.Option(help="Close every leaf link (a device that renamed its leaf).")
    ] = False,
) -> None:
    """Close a revoked edge's leaf link on a hub that tandem mesh cannot reload itself
    (a cluster: after its pods reloaded the new users, docs/deploy.md)."""
    mesh = _mesh(directory)
    if any(n.name == name for n in mesh.nodes()):
        fail(f"{name} is still admitted: tandem mesh revoke {name} first")
    _cut_leaf(mesh, name, hub_url, kick_all_leaves)


def _cut_leaf(mesh: MeshDir, name: str, hub_url: str | None, kick_all: bool) -> None:
    import asyncio

    from mesh.errors import MeshError
    from mesh.leaf import kick_leaf_links

    if not mesh.system_creds.exists():
        typer.echo("this mesh has no system identity (made before it existed): restart the "
                   "hub to cut the edge's leaf link, if it has one")  # fmt: skip
        return
    url = hub_url or mesh.client_url()
    tls_ca = mesh.tls_ca if mesh.tls_ca.exists() else None
    edges = None if kick_all else {name}
    try:
        kicked = asyncio.run(kick_leaf_links(url, mesh.system_creds, edges=edges, tls_ca=tls_ca))
    except (MeshError, OSError, TimeoutError) as exc:
        fail(f"the hub at {url} could not close leaf links: {exc}")
    typer.echo(f"closed leaf links: {', '.join(kicked)}" if kicked else "no leaf link to close")


@app.command("list")
def list_nodes(directory: DirOption = None) -> None:
    """Every node the hub admits, with its role, public key and (edges) models."""
    from mesh.errors import MeshError

    try:
        nodes = _mesh(directory).nodes()
    except MeshError as exc:
        fail(str(exc))
    for node in nodes:
        models = f"  models: {', '.join(node.models)}" if node.models else ""
        typer.echo(f"{node.role:<9} {node.name:<24} {node.public_key}{models}")
