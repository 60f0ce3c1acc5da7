"""Helpers shared by the CLI commands: settings, logging, one-line failures."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings

if TYPE_CHECKING:
    from mesh.connection import MeshCredentials

S = TypeVar("S", bound=BaseSettings)
T = TypeVar("T")

# The data directory (models, label caches), for the commands that read or write it.
HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="TANDEM_HOME",
        show_default=False,
        help="Tandem's data directory (default: ~/.cache/tandem).",
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave: every option defaults to None ("unset"), so that the
    settings class or dataclass they feed keeps its own default for the rest."""
    return {name: value for name, value in options.items() if value is not None}


def settings_or_exit(cls: type[S], options: dict[str, Any]) -> S:
    """Build a settings object from CLI options and the environment, or exit clearly."""
    try:
        return cls(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # pydantic's, says nothing
        fail(f"invalid setting {where}: {message}" if where else f"invalid settings: {message}")


def configure_logging(level: str) -> None:
    """Log lines with time, level and logger name."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# NATS identity options of the commands that talk to the mesh as an operator.
NatsCredsOption = Annotated[
    Path | None,
    typer.Option(
        envvar="TANDEM_NATS_CREDS",
        show_default=False,
        help="NATS identity (nkey seed or .creds); default: $TANDEM_HOME/mesh/creds/operator.nk "
        "when it exists (tandem up writes it).",
    ),
]
NatsTlsCaOption = Annotated[
    Path | None,
    typer.Option(envvar="TANDEM_NATS_TLS_CA", show_default=False, help="CA of the NATS servers."),
]


def local_mesh_dir() -> Path:
    """The mesh directory ``tandem up`` keeps its hub config and credentials in."""
    from models.settings import tandem_home

    return tandem_home() / "mesh"


def operator_credentials(creds: Path | None, tls_ca: Path | None) -> MeshCredentials:
    """The ``MeshCredentials`` of an operator command: the given ones, or the local
    mesh's operator identity when there is one (anonymous otherwise)."""
    from mesh.connection import MeshCredentials
    from mesh.security import MeshDir

    if creds is None:
        local = MeshDir(local_mesh_dir()).creds("operator")
        creds = local if local.exists() else None
    return MeshCredentials(creds, tls_ca)


def on_mesh(
    nats_url: str,
    name: str,
    creds: Path | None,
    tls_ca: Path | None,
    work: Callable[[Any], Awaitable[T]],
) -> T:
    """Connect as an operator (``operator_credentials``), run ``work(nc)``, close; a mesh
    that cannot be reached is one line. The command's own errors pass through."""
    import asyncio

    from mesh.connection import connect
    from mesh.errors import MeshError

    async def main() -> T:
        nc = await connect(nats_url, name=name, credentials=operator_credentials(creds, tls_ca))
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except MeshError as exc:
        fail(str(exc))
