"""Settings of the edge daemon: one class, every default defined here once.

Each field reads the environment variable ``TANDEM_EDGE_<FIELD>``; the CLI's
options map onto the same names.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class EdgeSettings(BaseSettings):
    """Configuration of ``tandem edge serve``."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_EDGE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model: str = Field("smollm2-135m", description="catalog model pair served by this edge")
    gguf: Path | None = Field(None, description="GGUF file overriding the catalog's edge weights")
    n_ctx: int = Field(2048, ge=128)
    n_threads: int = Field(1, ge=1, description="llama.cpp generation threads per slot")
    n_threads_batch: int | None = Field(None, ge=1, description="prompt threads; default n_threads")
    slots: int = Field(1, ge=1, le=64, description="concurrent llama.cpp contexts")
    max_queue: int = Field(64, ge=0, description="requests that may wait for a slot before 429")
    session_cache_mb: int = Field(512, ge=0, description="RAM for saved conversation KV states")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer <key>'")
    nats_url: str | None = Field(None, description="join the mesh at this NATS URL")
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
    engine: Literal["llama", "sim"] = Field(
        "llama", description="'sim': a simulated engine (latency model, no weights) for scale runs"
    )
    sim_profile: Path | None = Field(
        None, description="latency profile JSON for --engine sim; the shipped default if unset"
    )
    log_level: str = "info"
