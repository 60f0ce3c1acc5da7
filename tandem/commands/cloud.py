"""``tandem cloud``: run a cloud worker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from models.latency import EngineKind
from tandem.commands.common import configure_logging, fail, given, settings_or_exit

app = typer.Typer(help="Run a cloud worker (vLLM behind NATS).", no_args_is_help=True)


@app.command()
def serve(
    nats_url: Annotated[str | None, typer.Option(help="NATS URL of the mesh.")] = None,
    nats_creds: Annotated[
        Path | None, typer.Option(help="NATS identity: nkey seed file or .creds.")
    ] = None,
    nats_tls_ca: Annotated[Path | None, typer.Option(help="CA of the NATS servers.")] = None,
    model: Annotated[str | None, typer.Option(help="Catalog model pair to serve.")] = None,
    worker_id: Annotated[str | None, typer.Option(help="This worker's id on the mesh.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Override the catalog dtype.")] = None,
    kv_cache_gb: Annotated[float | None, typer.Option(help="KV cache GiB (CPU).")] = None,
    cpu_cores: Annotated[str | None, typer.Option(help="CPU cores for vLLM, e.g. '1'.")] = None,
    tool_parser: Annotated[str | None, typer.Option(help="vLLM tool parser name.")] = None,
    stream_interval: Annotated[
        int | None,
        typer.Option(help="Tokens per stream message after the first (vLLM's)."),
    ] = None,
    enforce_eager: Annotated[
        bool | None,
        typer.Option(
            "--enforce-eager/--no-enforce-eager",
            help="Skip torch.compile (vLLM's): starts ~55 s sooner on CPU, decodes 7-14% slower.",
        ),
    ] = None,
    engine: Annotated[
        EngineKind | None,
        typer.Option(help="'real' (vLLM), or 'sim': a SIMULATED engine for scale runs."),
    ] = None,
    sim_profile: Annotated[
        Path | None, typer.Option(help="Latency profile JSON for --engine sim.")
    ] = None,
    http_host: Annotated[
        str | None,
        typer.Option(help="Address of /health, /ready, /metrics; a cluster sets 0.0.0.0."),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="Port of /health, /ready, /metrics (0: off).")
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(help="both (monolithic, default), prefill or decode (disaggregated)."),
    ] = None,
    kv_connector: Annotated[
        str | None,
        typer.Option(help="vLLM KV connector: ExampleConnector (CPU), NixlConnector (GPU)."),
    ] = None,
    kv_connector_extra_config: Annotated[
        str | None,
        typer.Option(
            help='The connector\'s extra config, JSON: \'{"shared_storage_path": "/kv"}\'.'
        ),
    ] = None,
    prefill_timeout_s: Annotated[
        float | None, typer.Option(help="Decode role: wait this long for a prefill worker.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Serve a catalog pair's target model with vLLM on the mesh.

    Every option also reads TANDEM_CLOUD_<OPTION> from the environment.
    Example: tandem cloud serve --nats-url nats://127.0.0.1:4222
    SIGTERM drains: in-flight requests finish, new ones go to other workers.
    Disaggregated: tandem cloud serve --role prefill --kv-connector ExampleConnector
    --kv-connector-extra-config '{"shared_storage_path": "/kv"}' (and --role decode, the same
    connector): decode workers ask prefill workers for long prompts' KV (the routing
    policy's disaggregation section says when).
    Probes and Prometheus: GET /health, /ready and /metrics on --http-port (8081).
    """
    options = given(locals())
    import asyncio

    from cloud.service import run_worker
    from cloud.settings import CloudSettings

    settings = settings_or_exit(CloudSettings, options)
    configure_logging(settings.log_level)
    try:
        asyncio.run(run_worker(settings))
    except Exception as exc:  # startup failures: one clear line
        fail(f"cloud worker failed: {exc}")
