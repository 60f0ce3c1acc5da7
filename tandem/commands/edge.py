"""``tandem edge``: run the edge daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from models.latency import EngineKind
from tandem.commands.common import configure_logging, fail, given, settings_or_exit

app = typer.Typer(help="Run the edge daemon (OpenAI API on llama.cpp).", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    tls_certfile: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate.")
    ] = None,
    tls_keyfile: Annotated[Path | None, typer.Option(help="The certificate's private key.")] = None,
    model: Annotated[str | None, typer.Option(help="Catalog model pair to serve.")] = None,
    gguf: Annotated[Path | None, typer.Option(help="GGUF file overriding the catalog.")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    n_threads: Annotated[int | None, typer.Option(help="llama.cpp threads per slot.")] = None,
    slots: Annotated[
        int | None, typer.Option(help="batching=slots: concurrent llama.cpp contexts.")
    ] = None,
    batching: Annotated[
        str | None,
        typer.Option(help="'batched' (one shared context, the default) or 'slots' (one each)."),
    ] = None,
    sequences: Annotated[
        int | None, typer.Option(help="batching=batched: requests decoded together.")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests before 429.")] = None,
    max_n: Annotated[int | None, typer.Option(help="Most choices (n) per request.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require this Bearer key.")] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="Per-tenant API keys file (tandem keys create --file).")
    ] = None,
    mesh_api_keys: Annotated[
        bool | None,
        typer.Option(
            "--mesh-api-keys/--no-mesh-api-keys",
            help="Per-tenant API keys from the mesh (tandem keys create), followed live.",
        ),
    ] = None,
    nats_url: Annotated[str | None, typer.Option(help="Join the mesh at this NATS URL.")] = None,
    nats_creds: Annotated[
        Path | None, typer.Option(help="NATS identity: nkey seed file or .creds.")
    ] = None,
    nats_tls_ca: Annotated[Path | None, typer.Option(help="CA of the NATS servers.")] = None,
    node_id: Annotated[str | None, typer.Option(help="This node's id on the mesh.")] = None,
    policy_file: Annotated[Path | None, typer.Option(help="Routing policy YAML.")] = None,
    engine: Annotated[
        EngineKind | None,
        typer.Option(help="'real' (llama.cpp), or 'sim': a SIMULATED engine for scale runs."),
    ] = None,
    sim_profile: Annotated[
        Path | None, typer.Option(help="Latency profile JSON for --engine sim.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Serve the OpenAI API on this machine with llama.cpp.

    Every option also reads TANDEM_EDGE_<OPTION> from the environment, e.g.
    TANDEM_EDGE_PORT=8080. Example: tandem edge serve --port 8080; with HTTPS:
    tandem edge serve --tls-certfile edge-http.pem --tls-keyfile edge-http-key.pem
    """
    options = given(locals())
    from edge.server import serve as run_server
    from edge.settings import EdgeSettings

    settings = settings_or_exit(EdgeSettings, options)
    configure_logging(settings.log_level)
    try:
        run_server(settings)
    except Exception as exc:  # startup failures: one clear line, no traceback
        fail(f"edge failed to start: {exc}")


@app.command()
def install(
    bundle: Annotated[
        Path, typer.Option(help="The edge's bundle (tandem mesh add-edge writes it).")
    ],
    prefix: Annotated[
        Path, typer.Option(help="Install root: files go to PREFIX/etc/... (default /).")
    ] = Path("/"),
    dry_run: Annotated[bool, typer.Option(help="Print the files; write nothing.")] = False,
    host: Annotated[str, typer.Option(help="Where the edge's OpenAI API listens.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The edge's HTTP port.")] = 8080,
    memory_max: Annotated[str, typer.Option(help="systemd MemoryMax of the edge.")] = "4G",
    mesh_api_keys: Annotated[
        bool, typer.Option(help="Require per-tenant API keys from the mesh.")
    ] = False,
    tandem_bin: Annotated[
        Path | None, typer.Option(help="The tandem executable the unit runs.")
    ] = None,
    nats_server_bin: Annotated[
        Path | None, typer.Option(help="The nats-server the leaf unit runs.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an install for another mesh.")] = False,
) -> None:
    """Install this device's edge: systemd units for the edge and its NATS leaf node,
    the leaf's config and the environment file, from the bundle of tandem mesh add-edge.

    Then: systemctl daemon-reload && systemctl enable --now tandem-nats-leaf tandem-edge
    """
    from mesh.bundle import read_bundle
    from mesh.errors import MeshError
    from tandem.device import DeviceOptions, render
    from tandem.device import install as write_install

    options = DeviceOptions(
        prefix=prefix.absolute(), host=host, port=port, memory_max=memory_max,
        mesh_api_keys=mesh_api_keys, tandem_bin=tandem_bin, nats_server_bin=nats_server_bin,
    )  # fmt: skip
    try:
        edge_bundle = read_bundle(bundle)
        if dry_run:
            for f in render(edge_bundle, options):
                secret = f.mode & 0o077 == 0 and not f.path.name.endswith(".service")
                body = "(secret: not printed)\n" if secret else f.text
                typer.echo(f"# {f.path} (mode {f.mode:o})\n{body}")
            return
        paths = write_install(edge_bundle, options, force=force)
    except MeshError as exc:
        fail(str(exc))
    for path in paths:
        typer.echo(f"wrote {path}")
    typer.echo(
        "next: systemctl daemon-reload && systemctl enable --now tandem-nats-leaf tandem-edge"
    )
