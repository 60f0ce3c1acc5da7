"""Settings of a cloud worker: one class; every field reads ``TANDEM_CLOUD_<FIELD>``."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mesh.connection import DEFAULT_NATS_URL
from models.catalog import DEFAULT_N_CTX, DEFAULT_PAIR
from models.latency import EngineKind

# What a worker does in a disaggregated deployment (cloud.disaggregation):
#   both     today's monolithic worker: serves generate and verify, prefills itself
#   prefill  serves the prefill pool only: computes a prompt's KV for a decode worker
#   decode   serves generate and verify; asks the prefill pool for long uncached prompts
WorkerRole = Literal["prefill", "decode", "both"]
# vLLM's KVTransferConfig.kv_role for each worker role.
KV_ROLES: dict[str, str] = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


class CloudSettings(BaseSettings):
    """Configuration of ``tandem cloud serve``."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_CLOUD_", extra="forbid")

    nats_url: str = DEFAULT_NATS_URL
    nats_creds: Path | None = Field(
        None, description="this worker's NATS identity: nkey seed (tandem mesh add-worker)"
    )
    nats_tls_ca: Path | None = Field(None, description="CA that signs the NATS servers' certs")
    model: str = Field(DEFAULT_PAIR, description="catalog model pair whose target this serves")
    worker_id: str = Field(
        default_factory=lambda: f"cloud-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    )
    max_model_len: int = Field(DEFAULT_N_CTX, ge=128, description="context window in tokens")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="override the catalog's cloud dtype"
    )
    kv_cache_gb: float = Field(
        2.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)"
    )
    cpu_cores: str | None = Field(
        None,
        description="CPU build: cores for vLLM's threads, e.g. '1' or '0-3' "
        "(VLLM_CPU_OMP_THREADS_BIND); default lets vLLM pick",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one worker splits the model over (vLLM's; GPU clusters)"
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="KV cache block in tokens; prefix caching reuses whole blocks, so smaller "
        "blocks leave less of a re-sent context to recompute (speculative verification "
        "re-sends it every round). Default: vLLM's (128 on CPU, 16 on GPU)",
    )
    tool_parser: str | None = Field(None, description="vLLM tool parser; the catalog's by default")
    enforce_eager: bool = Field(
        False,
        description="run the model without torch.compile (vLLM's --enforce-eager): on "
        "a 2-core CPU the engine started in 26 s instead of 80 s and decoded 7-14% "
        "slower (docs/benchmarks.md); a start is a scale-up's lead time",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="tokens per stream message after the first (vLLM's --stream-interval): "
        "1 sends every token at once; more cut the per-message overhead of long answers "
        "at the cost of a burstier stream",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="refuse new generate requests (503, 'at capacity') while this many are "
        "in flight here: the edge asks another worker, then falls back as its policy says; "
        "default: accept all, each bounded by its requester's deadline",
    )
    heartbeat_s: float = Field(1.0, gt=0)
    keepalive_s: float = Field(0.5, gt=0, description="idle gap before a keepalive chunk")
    liveness_s: float = Field(2.0, gt=0, description="how often to check the requester is there")
    drain_timeout_s: float = Field(60.0, ge=0)
    http_host: str = Field(
        "127.0.0.1",
        description="address of /health, /ready and /metrics; loopback suits a dev machine, "
        "a cluster sets 0.0.0.0 so the kubelet and Prometheus reach the pod",
    )
    http_port: int = Field(
        8081, ge=0, le=65535, description="port of /health, /ready and /metrics; 0 disables them"
    )
    engine: EngineKind = Field(
        EngineKind.REAL,
        description="'real': vLLM; 'sim': a simulated engine (latency model, no vLLM) for "
        "scale runs",
    )
    sim_profile: Path | None = Field(
        None, description="latency profile JSON for --engine sim; the shipped default if unset"
    )
    role: WorkerRole = Field(
        "both",
        description="'both': a monolithic worker (the default); 'prefill': computes prompts' "
        "KV for decode workers; 'decode': serves edges, fetching long prompts' KV from a "
        "prefill worker (both need --kv-connector)",
    )
    kv_connector: str | None = Field(
        None,
        description="vLLM KV connector carrying KV between prefill and decode workers: "
        "ExampleConnector (shared storage; vLLM-CPU), NixlConnector (GPU clusters)",
    )
    # NoDecode: the validator below parses the JSON, so bad JSON is a clear error there.
    kv_connector_extra_config: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="the connector's extra config, a JSON object (vLLM's "
        'kv_connector_extra_config), e.g. \'{"shared_storage_path": "/kv"}\'',
    )
    prefill_timeout_s: float = Field(
        30.0,
        gt=0,
        description="decode role: how long to wait for a prefill worker before prefilling "
        "locally (the request's deadline bounds it too)",
    )
    log_level: str = "info"

    @field_validator("kv_connector_extra_config", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """The CLI passes the extra config as JSON text (the environment does too)."""
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object, e.g. {"shared_storage_path": "/kv"}')
        return value

    @model_validator(mode="after")
    def _roles_need_a_connector(self) -> Self:
        # A simulated engine models the hand-over without a connector.
        if self.role != "both" and self.kv_connector is None and self.engine == "real":
            raise ValueError(
                f"--role {self.role} needs --kv-connector: the prompt's KV travels between "
                "prefill and decode workers through vLLM's KV connector"
            )
        if self.kv_connector_extra_config and self.kv_connector is None:
            raise ValueError("kv_connector_extra_config is set but no kv_connector")
        return self

    @property
    def kv_role(self) -> str | None:
        """vLLM's ``kv_role`` for this worker, or None without a connector."""
        return None if self.kv_connector is None else KV_ROLES[self.role]
