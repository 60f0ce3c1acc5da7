"""Settings of the edge daemon: one class, every default defined here once.

Each field reads the environment variable ``TANDEM_EDGE_<FIELD>``; the CLI's
options map onto the same names. Defaults that other processes need too live in
the library they share: the model pair and its context window in the catalog
(``models.catalog``), the engine vocabulary in ``models.latency``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.catalog import DEFAULT_PAIR
from models.latency import EngineKind

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_EDGE_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"  # where clients find an edge


class EdgeSettings(BaseSettings):
    """Configuration of ``tandem edge serve``."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_EDGE_", extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    tls_certfile: FilePath | None = Field(
        None,
        description="serve HTTPS with this PEM certificate, e.g. from tandem mesh issue-cert "
        "(needs tls_keyfile)",
    )
    tls_keyfile: FilePath | None = Field(None, description="the private key of tls_certfile")
    model: str = Field(DEFAULT_PAIR, description="catalog model pair served by this edge")
    gguf: Path | None = Field(None, description="GGUF file overriding the catalog's edge weights")
    n_ctx: int | None = Field(
        None, ge=128, description="context window in tokens; the catalog pair's n_ctx if unset"
    )
    n_threads: int = Field(1, ge=1, description="llama.cpp generation threads per slot")
    n_threads_batch: int | None = Field(None, ge=1, description="prompt threads; default n_threads")
    slots: int = Field(1, ge=1, le=64, description="batching=slots: concurrent llama.cpp contexts")
    batching: Literal["batched", "slots"] = Field(
        "batched",
        description="'batched': one llama.cpp context decoding up to `sequences` requests "
        "together (continuous batching, speculative drafting included); 'slots': one context "
        "per request (slots of them), each answer reproducible across cache states",
    )
    sequences: int = Field(
        32, ge=1, le=256, description="batching=batched: requests decoded together"
    )
    kv_tokens: int | None = Field(
        None,
        ge=128,
        description="batching=batched: KV cache cells shared by the sequences; "
        "8 context windows if unset",
    )
    max_queue: int = Field(64, ge=0, description="requests that may wait for a slot before 429")
    session_cache_mb: int = Field(512, ge=0, description="RAM for saved conversation KV states")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_n: int = Field(8, ge=1, le=128, description="most choices (n) one request may ask for")
    api_key: SecretStr | None = Field(
        None, description="one shared key: require 'Authorization: Bearer <key>' (tenant: default)"
    )
    api_keys_file: Path | None = Field(
        None,
        description="per-tenant API keys (tandem keys create --file): every request needs one; "
        "the file is re-read when it changes",
    )
    mesh_api_keys: bool = Field(
        False,
        description="per-tenant API keys from the mesh's key bucket (tandem keys create), "
        "followed live: every request needs one",
    )
    nats_url: str | None = Field(None, description="join the mesh at this NATS URL")
    nats_creds: Path | None = Field(
        None, description="this edge's NATS identity: nkey seed (tandem mesh add-edge) or .creds"
    )
    nats_tls_ca: Path | None = Field(None, description="CA that signs the NATS servers' certs")
    node_id: str = Field(default_factory=lambda: f"edge-{socket.gethostname()}")
    heartbeat_s: float = Field(1.0, gt=0)
    cloud_timeout_s: float = Field(300.0, gt=0, description="deadline of a cloud request")
    cloud_stall_timeout_s: float = Field(
        3.0, gt=0, description="silence after which a cloud worker is presumed dead"
    )
    policy_file: Path | None = Field(None, description="routing policy YAML")
    emulated_rtt_ms: float = Field(
        0.0, ge=0, description="benchmarks only: extra edge-cloud round-trip time per request"
    )
    engine: EngineKind = Field(
        EngineKind.REAL,
        description="'real': llama.cpp; 'sim': a simulated engine (latency model, no weights) "
        "for scale runs",
    )
    sim_profile: Path | None = Field(
        None, description="latency profile JSON for --engine sim; the shipped default if unset"
    )
    log_level: str = "info"

    @field_validator("gguf")
    @classmethod
    def _gguf_is_a_model_file(cls, path: Path | None) -> Path | None:
        # At start, in one line, rather than llama.cpp's traceback from the first load.
        from models.errors import ModelError
        from models.llama_loader import check_gguf

        if path is None:
            return None
        try:
            return check_gguf(path)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _one_source_of_api_keys(self) -> EdgeSettings:
        if self.mesh_api_keys and self.api_keys_file is not None:
            raise ValueError("choose one source of API keys: api_keys_file or mesh_api_keys")
        if self.mesh_api_keys and not self.nats_url:
            raise ValueError("mesh_api_keys follows the mesh's key bucket: set nats_url too")
        return self

    @model_validator(mode="after")
    def _tls_certificate_and_key_together(self) -> EdgeSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("HTTPS needs both tls_certfile and tls_keyfile (or neither)")
        return self
