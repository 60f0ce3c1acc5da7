"""``tandem keys``: per-tenant API keys of the edge API: create, list, revoke.

Examples::

    tandem keys create --tenant acme --rpm 60 --tpm 40000 --cloud-tokens-per-hour 200000
    tandem keys list
    tandem keys revoke 3f9a0c1b2d4e            # every edge refuses it within seconds
    tandem keys create --tenant acme --file /etc/tandem/keys.json   # an edge off the mesh

The secret is printed once, on stdout alone (``KEY=$(tandem keys create ...)``);
the mesh's bucket (or the file) holds only its SHA-256. Edges follow the bucket
with ``--mesh-api-keys`` and a file with ``--api-keys-file``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mesh.connection import DEFAULT_NATS_URL
from tandem.commands.common import NatsCredsOption, NatsTlsCaOption, fail, on_mesh

app = typer.Typer(help="Per-tenant API keys of the edge API: create, list, revoke.")
_IDENTITY: dict[str, Path | None] = {"creds": None, "tls_ca": None}
T = TypeVar("T")

NatsUrl = Annotated[str, typer.Option(help="NATS URL of the mesh.", envvar="TANDEM_NATS_URL")]
FileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        help="A key file for an edge off the mesh (its --api-keys-file), instead of the mesh.",
    ),
]
_DURATION = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@app.callback()
def _identity(nats_creds: NatsCredsOption = None, nats_tls_ca: NatsTlsCaOption = None) -> None:
    """Per-tenant API keys of the edge API: create, list, revoke."""
    _IDENTITY.update(creds=nats_creds, tls_ca=nats_tls_ca)


def expiry(text: str, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``2w``, ``90m`` from now, or an ISO date/time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    if match := _DURATION.fullmatch(text):
        return now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--expires {text!r}: give a duration (30d, 12h, 2w, 90m) or an ISO date")
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when <= now:
        fail(f"--expires {text!r} is in the past")
    return when


def _on_mesh(nats_url: str, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Connect as the operator, open the key bucket, run ``work(store, nc)``, close."""
    import nats.errors

    from edge.api_keys import KeyStore

    async def with_store(nc: Any) -> T:
        return await work(await KeyStore.open(nc, create=True), nc)

    try:
        return on_mesh(nats_url, "tandem-keys", _IDENTITY["creds"], _IDENTITY["tls_ca"],
                       with_store)  # fmt: skip
    except (TimeoutError, nats.errors.Error) as exc:  # a refused publish surfaces as a timeout
        fail(
            f"the mesh did not answer ({type(exc).__name__}: {exc}); does this identity have "
            "the operator role (tandem mesh add-operator)?"
        )


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="The tenant the key's requests are charged to.")],
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute, per edge.")] = None,
    tpm: Annotated[
        int | None, typer.Option(min=1, help="Tokens (prompt + completion) per minute, per edge.")
    ] = None,
    cloud_tokens_per_hour: Annotated[
        int | None,
        typer.Option(min=0, help="The tenant's cloud tokens per UTC hour over the whole fleet."),
    ] = None,
    over_budget: Annotated[
        str, typer.Option(help="Over the cloud budget: 'edge' (answer there) or 'fail' (429).")
    ] = "edge",
    expires: Annotated[
        str | None, typer.Option(help="30d, 12h, 2w, 90m from now, or an ISO date.")
    ] = None,
    may_set_tenant: Annotated[
        bool, typer.Option(help="Honour x-tandem-tenant from this key (gateways).")
    ] = False,
    description: Annotated[str, typer.Option(help="A note for the operators.")] = "",
    file: FileOption = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Create a key; its secret is printed once, on stdout."""
    from edge.api_keys import new_key, read_key_file, write_key_file
    from router.store import who

    if over_budget not in ("edge", "fail"):
        fail("--over-budget is 'edge' or 'fail'")
    action: Literal["edge", "fail"] = "edge" if over_budget == "edge" else "fail"
    secret, key = new_key(
        tenant,
        rpm=rpm,
        tpm=tpm,
        cloud_tokens_per_hour=cloud_tokens_per_hour,
        over_budget=action,
        may_set_tenant=may_set_tenant,
        expires_at=expiry(expires) if expires else None,
        created_by=who(),
        description=description,
    )
    if file is not None:
        try:
            write_key_file(file, [*read_key_file(file), key])
        except (OSError, ValueError) as exc:
            fail(str(exc))
    else:

        async def work(store: Any, nc: Any) -> None:
            await store.put(key)

        _on_mesh(nats_url, work)
    where = file or "the mesh"
    typer.secho(
        f"created key {key.id} for tenant {tenant!r} in {where}; the secret below is shown "
        "once and stored nowhere:",
        err=True,
    )
    typer.echo(secret)


@app.command(name="list")
def list_keys(
    file: FileOption = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
) -> None:
    """Every key (never a secret), and on the mesh each tenant's cloud tokens this hour."""
    from edge.api_keys import describe, read_key_file

    usage: dict[str, int] = {}
    if file is not None:
        try:
            keys = read_key_file(file)
        except (OSError, ValueError) as exc:
            fail(str(exc))
    else:

        async def work(store: Any, nc: Any) -> Any:
            from edge.fleet_usage import FleetUsage

            keys = await store.list()
            fleet = FleetUsage(nc)
            for key in keys:
                fleet.used(key.tenant)  # asks for the tenant's counter at the next sync
            await fleet.sync()
            return keys, {k.tenant: fleet.used(k.tenant) for k in keys}

        keys, usage = _on_mesh(nats_url, work)
    if output == "json":
        rows = [describe(k) | {"cloud_tokens_this_hour": usage.get(k.tenant)} for k in keys]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("key", "tenant", "rpm", "tpm", "cloud tokens/h", "expires", "created by")
    for k in keys:
        budget = "-" if k.cloud_tokens_per_hour is None else f"{k.cloud_tokens_per_hour}"
        if k.tenant in usage:
            budget = f"{usage[k.tenant]} / {budget}"
        table.add_row(
            f"{k.id}" + (" (may set tenant)" if k.may_set_tenant else ""),
            k.tenant,
            str(k.rpm or "-"),
            str(k.tpm or "-"),
            budget,
            k.expires_at.strftime("%Y-%m-%d %H:%M UTC") if k.expires_at else "never",
            k.created_by,
        )
    Console().print(table if keys else "no API keys")


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (tandem keys list).")],
    file: FileOption = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Revoke a key: every edge refuses it within seconds."""
    from edge.api_keys import read_key_file, write_key_file

    key_id = key_id.removeprefix("tdm-").split("-")[0]
    if file is not None:
        try:
            keys = read_key_file(file)
        except (OSError, ValueError) as exc:
            fail(str(exc))
        if not any(k.id == key_id for k in keys):
            fail(f"no key {key_id} in {file}")
        write_key_file(file, [k for k in keys if k.id != key_id])
        tenant = next(k.tenant for k in keys if k.id == key_id)
    else:

        async def work(store: Any, nc: Any) -> str:
            try:
                return str((await store.revoke(key_id)).tenant)
            except KeyError:
                fail(f"no key {key_id} on the mesh")

        tenant = _on_mesh(nats_url, work)
    typer.echo(f"revoked key {key_id} of tenant {tenant!r}")
