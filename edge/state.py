"""An edge daemon's state: settings, engine, prompts, metrics and the live policy.

``build_state`` loads the model and wires the pieces together; the app factory
(``edge.server``) owns the result, so there is no module-level mutable state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edge.api_keys import Authenticator, KeyFileFollower, KeyRing
from edge.cloud_route import CloudRoute
from edge.engine import LlamaEngine
from edge.fleet_usage import FleetUsage
from edge.generation import EdgeEngine, EngineConfig
from edge.metrics import EdgeMetrics
from edge.openai_protocol import unix_now
from edge.prompts import PromptBuilder
from edge.rate_limits import RateLimiter
from edge.registration import MeshRegistration
from edge.responses import ResponseStore
from edge.route_plan import EdgeLoad, PolicySnapshot
from edge.routing import ComplexityScorer, Observations
from edge.settings import EdgeSettings
from models.catalog import Catalog
from models.chat_template import load_template
from models.edge_weights import prepare_edge_weights
from router.live import LivePolicy
from router.policy import PolicyError, RoutingPolicy

logger = logging.getLogger(__name__)


@dataclass
class EdgeState:
    """Everything a request handler needs; owned by the app, no module globals."""

    settings: EdgeSettings
    engine: EdgeEngine
    prompts: PromptBuilder
    metrics: EdgeMetrics
    model_id: str
    created: int
    live: LivePolicy  # the routing policy in force; swapped whole on a new revision
    observations: Observations
    responses: ResponseStore  # stored Responses API answers, for previous_response_id
    auth: Authenticator = field(default_factory=Authenticator)  # who a request is
    limiter: RateLimiter = field(default_factory=RateLimiter)  # per-key rpm and tpm
    key_file: KeyFileFollower | None = None  # api_keys_file, re-read when it changes
    classifier: ComplexityScorer | None = None  # loaded when a policy needs it
    registration: MeshRegistration | None = None

    def policy_snapshot(self) -> PolicySnapshot:
        """The policy in force and its revision: read once per request, into its plan."""
        return PolicySnapshot(self.live.current, self.live.revision)

    def load(self) -> EdgeLoad:
        """This edge's queue and slots, and the healthy cloud workers for its model."""
        fleet = self.registration.fleet if self.registration else None
        workers = None if fleet is None else len(fleet.healthy_workers(self.model_id))
        return EdgeLoad(self.engine.waiting, self.engine.config.concurrency, workers)

    @property
    def fleet_usage(self) -> FleetUsage | None:
        """The tenants' fleet-wide cloud tokens, when this edge follows the mesh's keys."""
        return self.registration.fleet_usage if self.registration else None

    @property
    def cloud(self) -> CloudRoute | None:
        """The cloud route, when this edge is on a mesh."""
        return self.registration.cloud if self.registration else None


def engine_config(settings: EdgeSettings) -> tuple[EngineConfig, str]:
    """The engine config for the settings' catalog pair, and the pair's chat template."""
    pair = Catalog.load().get(settings.model)
    config = EngineConfig(
        model_path=settings.gguf or prepare_edge_weights(pair),
        n_ctx=settings.n_ctx or pair.edge.n_ctx,  # unset: the catalog pair's window
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch or settings.n_threads,
        slots=settings.slots,
        max_queue=settings.max_queue,
        session_cache_bytes=settings.session_cache_mb * 1024 * 1024,
        batched=settings.batching == "batched",
        sequences=settings.sequences,
        kv_tokens=settings.kv_tokens,
    )
    return config, load_template(pair.chat_template)


def load_policy(path: Path | None) -> LivePolicy:
    """The starting policy: a YAML file, or the built-in one (the store may replace it)."""
    if path is None:
        return LivePolicy(RoutingPolicy(), source="built-in")
    try:
        return LivePolicy(RoutingPolicy.from_yaml(path.read_text(encoding="utf-8")), "file")
    except (OSError, PolicyError) as exc:
        raise SystemExit(f"routing policy {path} is not usable:\n{exc}") from exc


def make_engine(settings: EdgeSettings, config: EngineConfig) -> EdgeEngine:
    """llama.cpp, or the simulated engine (latency model, no weights) for scale runs."""
    if settings.engine == "sim":
        from edge.sim_engine import SimEngine
        from models.latency import LatencyProfile

        return SimEngine(config, LatencyProfile.load(settings.sim_profile).edge)
    if config.batched:
        from edge.batched_engine import BatchedEngine

        return BatchedEngine(config)
    return LlamaEngine(config)


def build_state(settings: EdgeSettings) -> EdgeState:
    """Load the model and wire the engine, prompts and metrics together."""
    config, template = engine_config(settings)
    engine = make_engine(settings, config)
    metrics = EdgeMetrics()
    live = load_policy(settings.policy_file)
    _register_gauges(metrics, engine, live)
    auth, key_file = make_authenticator(settings)
    return EdgeState(
        settings=settings,
        engine=engine,
        prompts=PromptBuilder(template, engine.tokenize, config.n_ctx, engine.n_vocab),
        metrics=metrics,
        model_id=settings.model,
        created=unix_now(),
        live=live,
        observations=Observations(),
        responses=ResponseStore(),
        auth=auth,
        key_file=key_file,
        classifier=_load_classifier(),
    )


def make_authenticator(settings: EdgeSettings) -> tuple[Authenticator, KeyFileFollower | None]:
    """Who may call this edge: a shared key, a key file, the mesh's keys, or anyone.
    The mesh's keys start empty (every request is a 401) until the first read lands."""
    shared = settings.api_key.get_secret_value() if settings.api_key else None
    if settings.api_keys_file is None and not settings.mesh_api_keys:
        return Authenticator(shared), None
    ring = KeyRing()
    key_file = None
    if settings.api_keys_file is not None:
        try:
            key_file = KeyFileFollower(settings.api_keys_file, ring)
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"API key file {settings.api_keys_file} is not usable:\n{exc}"
            ) from exc
    source = "file" if key_file is not None else "mesh"
    return Authenticator(shared, ring, source), key_file


def _register_gauges(metrics: EdgeMetrics, engine: EdgeEngine, live: LivePolicy) -> None:
    """The engine's and the policy's own numbers, read by /metrics when scraped."""
    metrics.add_gauge(
        "tandem_edge_simulated_engine",
        "1 when this edge runs the SIMULATED engine (scale runs), else 0.",
        lambda: int(engine.simulated),
    )
    metrics.add_gauge(
        "tandem_edge_queue_depth", "Requests waiting for a slot.", lambda: engine.waiting
    )
    metrics.add_gauge(
        "tandem_edge_running_requests", "Requests generating now.", lambda: engine.running
    )
    metrics.add_gauge(
        "tandem_edge_session_cache_bytes",
        "Saved conversation KV bytes.",
        lambda: engine.session_cache_bytes,
    )
    metrics.add_counter(
        "tandem_edge_llama_prompt_eval_tokens",
        "llama.cpp's own count of prompt tokens evaluated (n_p_eval).",
        lambda: engine.perf_counters()["n_p_eval"],
    )
    metrics.add_counter(
        "tandem_edge_engine_generated_tokens",
        "Tokens llama.cpp generated, including for cancelled requests.",
        lambda: engine.generated_tokens,
    )
    metrics.add_counter(
        "tandem_edge_engine_busy_seconds",
        "Seconds llama.cpp slots spent serving requests, summed over slots.",
        lambda: engine.busy_seconds,
    )
    metrics.add_counter(
        "tandem_edge_cancelled_generations",
        "Generations stopped early because the client went away.",
        lambda: engine.cancelled_generations,
    )
    metrics.add_counter(
        "tandem_edge_prompt_pieces_cached",
        "Prompt pieces (text between special tokens) whose token ids came from the cache.",
        lambda: engine.token_cache.hits,
    )
    metrics.add_counter(
        "tandem_edge_prompt_pieces_tokenized",
        "Prompt pieces llama.cpp tokenized (not seen before, or evicted).",
        lambda: engine.token_cache.misses,
    )
    metrics.add_gauge(
        "tandem_edge_prompt_piece_cache_tokens",
        "Token ids held by the prompt-piece cache.",
        lambda: engine.token_cache.cached_tokens,
    )
    if hasattr(engine, "decode_steps"):  # the batched engine: how full its steps run
        metrics.add_counter(
            "tandem_edge_batch_decode_steps",
            "llama_decode calls of the batched engine (one step of every running sequence).",
            lambda: engine.decode_steps,
        )
        metrics.add_counter(
            "tandem_edge_batch_stepped_sequences",
            "Sequences evaluated, summed over the batched engine's decode steps (over "
            "decode steps: the mean batch).",
            lambda: engine.stepped_sequences,  # type: ignore[attr-defined]
        )
    metrics.add_gauge(
        "tandem_edge_policy_revision",
        "Store revision of the routing policy in force (0: a file or the built-in one).",
        lambda: live.revision or 0,
    )
    metrics.add_counter(
        "tandem_edge_policy_rejections",
        "Stored policy revisions refused as invalid (the last good one stayed in force).",
        lambda: live.rejections,
    )


def _load_classifier() -> ComplexityScorer | None:
    """The shipped complexity classifier; without it, complexity conditions never match."""
    try:
        from router.classifier import ClassifierError, ComplexityClassifier

        return ComplexityClassifier.load()
    except (ImportError, ClassifierError) as exc:
        logger.warning("no complexity classifier (%s); complexity rules will not match", exc)
        return None
