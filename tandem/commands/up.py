"""``tandem up``: run the whole mesh on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from edge.settings import DEFAULT_HOST, DEFAULT_PORT
from mesh.connection import DEFAULT_NATS_PORT
from models.catalog import DEFAULT_PAIR
from models.latency import EngineKind
from tandem.commands.common import configure_logging, fail


def up(
    host: Annotated[str, typer.Option(help="Interface for the edge's OpenAI API.")] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option(help="Edge HTTP port.", envvar="TANDEM_EDGE_PORT")
    ] = DEFAULT_PORT,
    nats_port: Annotated[
        int, typer.Option(help="NATS client port (0: any free port).")
    ] = DEFAULT_NATS_PORT,
    model: Annotated[str, typer.Option(help="Catalog model pair.")] = DEFAULT_PAIR,
    cloud: Annotated[bool, typer.Option(help="Also run a vLLM cloud worker.")] = True,
    engine: Annotated[
        EngineKind,
        typer.Option(help="'real' (llama.cpp + vLLM), or 'sim': SIMULATED engines for scale runs."),
    ] = EngineKind.REAL,
    secure: Annotated[
        bool,
        typer.Option(
            help="Per-node NATS identities (in $TANDEM_HOME/mesh); --no-secure admits anyone."
        ),
    ] = True,
) -> None:
    """Run NATS, a cloud worker (vLLM) and an edge daemon on this machine until Ctrl-C.

    Example: tandem up --port 8080, then point any OpenAI client at
    http://127.0.0.1:8080/v1.
    """
    from mesh.errors import MeshError
    from mesh.server import EmbeddedNats
    from models.settings import tandem_home
    from tandem.supervisor import SupervisorError
    from tandem.up import WORKER_ID, Role, cloud_role, edge_role, local_mesh, run_mesh

    configure_logging("info")
    simulated = engine == EngineKind.SIM

    def ready(nats_url: str) -> None:
        typer.secho(
            f"\nTandem is up: OpenAI API at http://{host}:{port}/v1 (model {model!r}), "
            f"NATS at {nats_url}{', cloud worker ready' if cloud else ''}"
            f"{' (SIMULATED engines: no model runs)' if simulated else ''}. "
            + (
                f"NATS admits only the identities in {mesh.root} (tandem mesh list); "
                "tandem policy and tandem status use its operator. "
                if mesh
                else "NATS admits anyone (--no-secure). "
            )
            + "Ctrl-C stops everything.\n",
            fg=typer.colors.GREEN,
        )

    mesh = local_mesh(tandem_home() / "mesh", model) if secure else None

    def roles(nats: EmbeddedNats) -> list[Role]:
        edge = edge_role(host, port, nats.url, model, simulated=simulated, mesh=mesh)
        worker = cloud_role(nats, model, WORKER_ID, simulated=simulated, mesh=mesh)
        return [worker, edge] if cloud else [edge]

    try:
        run_mesh(
            roles,
            nats_port=nats_port,
            store_dir=tandem_home() / "nats",
            run_dir=tandem_home() / "run",
            on_ready=ready,
            nats_config=mesh.auth_conf if mesh else None,
        )
    except (SupervisorError, MeshError) as exc:
        fail(str(exc))
