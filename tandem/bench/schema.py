"""The JSON report of ``tandem bench run``: one pydantic model per object, this module only.

``BenchReport.model_json_schema()`` is the documented schema. Every quantity
that does not apply to a run is ``null`` with the reason in the field's
description (for example speculative acceptance when no request took the
speculative route), never a made-up zero.

Units: latencies in milliseconds, engine time in seconds, money in US dollars.
"Turn" means one LLM call (one chat completion); "session" means one agentic
interaction of several calls (a BFCL scenario, an MT-Bench chat, a synthetic
agent run).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tandem.bench.cost import CostModel

SCHEMA_VERSION = 2  # 2: quality.enforced, config.enforce_tool_choice


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Percentiles(_Model):
    """Distribution of one latency: count, mean and the 50th/95th/99th percentiles."""

    count: int
    mean: float | None = Field(description="null when count is 0")
    p50: float | None
    p95: float | None
    p99: float | None


class EnforcedQuality(_Model):
    """BFCL tool calls of one mode when every step that expects a call enforces one.

    A pass of its own after the mode's measured window: the same BFCL sessions
    again, each step whose ground truth is a call sent with ``tool_choice:
    "required"`` (the edge and the cloud then decode under a grammar that only
    allows a call of an offered tool with arguments valid for its parameters),
    the answers in words free as before. Not part of the mode's latency or cost.
    """

    sessions: int = Field(description="BFCL sessions of the pass that finished")
    failed_sessions: int
    error_samples: list[str] = Field(
        description="e.g. an HTTP 400 for a tool schema constrained decoding cannot enforce"
    )
    bfcl_steps: int = Field(description="enforced steps that had a ground-truth call to match")
    tool_call_validity: float | None = Field(
        description="share of enforced steps answered with a parsable call of an offered "
        "tool (a call cut short by max_tokens is not); null without steps"
    )
    tool_call_accuracy: float | None = Field(
        description="share of enforced steps whose call equals the ground truth (name and "
        "arguments); null without steps"
    )
    cut_by_max_tokens: int = Field(
        description="enforced steps whose answer stopped at max_tokens (finish_reason "
        "'length'), which cuts a call short"
    )
    route_mix: dict[str, int] = Field(
        description="enforced steps per route that served them (the speculative route "
        "sends constrained requests to the cloud)"
    )


class Quality(_Model):
    """Answer-quality proxies of one mode."""

    bfcl_steps: int = Field(
        description="model steps of the measured window that had a ground-truth call to match"
    )
    tool_call_validity: float | None = Field(
        description="free decoding (no tool_choice sent): share of BFCL steps answered with "
        "a parsable call of an offered tool; null without BFCL steps"
    )
    tool_call_accuracy: float | None = Field(
        description="free decoding: share of BFCL steps whose call equals the ground truth "
        "(name and arguments); null without BFCL steps"
    )
    enforced: EnforcedQuality | None = Field(
        description="the same BFCL sessions with tool_choice enforced on every step that "
        "expects a call; null when the run did not enforce (--no-enforce-tool-choice) or the "
        "mode played no BFCL session"
    )
    agreement_compared: int = Field(
        description="calls served off the cloud (edge, fallback, speculative) that were "
        "replayed on the cloud route after the mode's measured window"
    )
    agreement_with_cloud: float | None = Field(
        description="share of those calls whose answer (text and tool calls) equals the "
        "cloud's answer to the exact same request; null when the mode served every call "
        "on the cloud (cloud-only, naive) or no replay reached a cloud worker"
    )


class ModeResult(_Model):
    """Everything measured for one mode at one concurrency."""

    mode: str
    concurrency: int
    sessions: int = Field(description="sessions that finished without an error")
    failed_sessions: int
    requests: int = Field(description="LLM calls that finished")
    errors: int = Field(description="LLM calls that failed (HTTP error or broken stream)")
    error_samples: list[str]
    wall_s: float
    turn_latency_ms: Percentiles
    session_latency_ms: Percentiles
    session_latency_ms_by_workload: dict[str, Percentiles]
    ttft_ms: Percentiles
    tpot_ms: Percentiles = Field(description="time per output token after the first")
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    prompt_tokens: int
    completion_tokens: int
    route_mix: dict[str, int] = Field(description="calls per route that served them")
    tokens_by_route: dict[str, int] = Field(
        default_factory=dict, description="prompt + completion tokens per route"
    )
    speculative_acceptance: float | None = Field(
        description="accepted / drafted tokens; null when no call took the speculative route"
    )
    prefix_cache_hit_rate: float | None = Field(
        description="cached / prompt tokens over all calls (edge KV reuse and vLLM's cache)"
    )
    prefix_cache_hit_rate_by_route: dict[str, float]
    edge_engine_s: float | None = Field(
        description="llama.cpp busy seconds during the mode; null if the edge lacks the counter"
    )
    cloud_engine_s: float | None = Field(
        description="vLLM busy seconds of every cloud worker heard; null without the mesh's "
        "heartbeats or when a worker does not report engine_busy_s"
    )
    edge_engine_s_per_mtok: float | None
    cloud_engine_s_per_mtok: float | None
    cost_usd_per_mtok: float | None = Field(
        description="from the cost model; null when engine seconds are unknown"
    )
    quality: Quality


class Machine(_Model):
    """Where the run happened, and how busy the machine was."""

    cpu_count: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    engine: str = Field(description="'real' (llama.cpp and vLLM); simulated runs say so")


class BenchConfig(_Model):
    """The options of the run: enough to reproduce it."""

    command: str
    base_url: str
    nats_url: str | None
    started_mesh: bool
    workloads: list[str]
    modes: list[str]
    concurrency: list[int]
    sessions: int
    duration_s: float | None
    arrival: str
    rate_per_s: float | None
    seed: int
    rtt_ms: float | None = Field(description="emulated edge-cloud RTT; null: the edge's own")
    max_tokens: int
    temperature: float
    enforce_tool_choice: bool = Field(
        description="each mode's BFCL sessions were also played with tool_choice 'required'"
    )
    cost_model: CostModel


class Headline(_Model):
    """The quantities the product paper reports, measured in this run."""

    agentic_session_p95_ms: float | None = Field(
        description="hybrid mode, BFCL sessions (the complex agentic interactions), P95"
    )
    batching_throughput_gain_pct: float | None = Field(
        description="cloud-only over naive sequential output tokens/s at the highest "
        "concurrency, minus 100%"
    )
    hybrid_cost_change_pct: float | None = Field(
        description="hybrid over cloud-only cost per million tokens, minus 100%"
    )
    max_concurrent_sessions: int = Field(description="the highest concurrency this run held")


class BenchReport(_Model):
    """The whole report of one ``tandem bench run``."""

    schema_version: int = SCHEMA_VERSION
    started_at: str
    config: BenchConfig
    machine: Machine
    results: list[ModeResult]
    headline: Headline
    notes: list[str]
