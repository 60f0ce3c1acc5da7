"""The ``tandem`` command: one sub-command per area, composed here.

Example::

    tandem up                 # NATS + cloud worker + edge on this machine
    tandem edge serve --port 8080
    tandem cloud serve --nats-url nats://127.0.0.1:4222
    tandem status
    tandem policy show        # the live routing policy (edit, set, history, explain)
    tandem keys create --tenant acme --rpm 60   # a per-tenant API key of the edge API
    tandem models list
    tandem planner run --connector local   # size the cloud fleet ahead of demand
    tandem bench run --start-mesh
"""

from __future__ import annotations

import typer

from mesh.version import __version__
from tandem.commands import (
    bench,
    cloud,
    edge,
    keys,
    mesh,
    models,
    planner,
    policy,
    router,
    status,
    up,
)

app = typer.Typer(
    help="Tandem: a hybrid edge-cloud LLM inference mesh.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(edge.app, name="edge")
app.add_typer(cloud.app, name="cloud")
app.add_typer(models.app, name="models")
app.add_typer(router.app, name="router")
app.add_typer(policy.app, name="policy")
app.add_typer(mesh.app, name="mesh")
app.add_typer(keys.app, name="keys")
app.add_typer(bench.app, name="bench")
app.add_typer(planner.app, name="planner")
app.command(name="up")(up.up)
app.command(name="status")(status.status)


@app.command()
def version() -> None:
    """Print Tandem's version."""
    typer.echo(__version__)


if __name__ == "__main__":
    app()
