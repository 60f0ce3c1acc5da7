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

import errno
import os
from pathlib import Path

import typer

from mesh.version import __version__
from models.settings import tandem_home
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


def main() -> None:
    """The console script: ``app``, with a file-system failure told in one line.

    A ``TANDEM_HOME`` that cannot be written (a path under a file, a read-only or full
    disk) fails deep inside whichever command first writes there; the person needs the
    path and the reason, not the stack. ``TANDEM_TRACEBACK=1`` shows the stack too.
    """
    try:
        app()
    except OSError as exc:
        if os.environ.get("TANDEM_TRACEBACK") == "1":
            raise
        where = f": {exc.filename}" if exc.filename else ""
        hint = ""
        home = tandem_home()
        if exc.filename and Path(str(exc.filename)).is_relative_to(home):
            hint = f" (TANDEM_HOME is {home}: point it at a writable directory)"
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a write names no file
            hint = f" (a disk is full; TANDEM_HOME is {home}: free space there or move it)"
        typer.echo(f"error: {exc.strerror or exc}{where}{hint}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
