"""Prometheus metrics of one edge daemon, on a registry the app owns."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Buckets in seconds: TTFT spans queueing (seconds) down to cached prefixes (ms).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class EdgeMetrics:
    """Request, token and latency metrics, plus live gauges read on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_edge_requests",
            "Finished HTTP API requests.",
            ["endpoint", "route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tandem_edge_prompt_tokens", "Prompt tokens of served requests.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "tandem_edge_cached_prompt_tokens",
            "Prompt tokens served from a reused KV prefix.",
            registry=r,
        )
        self.completion_tokens = Counter(
            "tandem_edge_completion_tokens", "Generated tokens.", registry=r
        )
        self.drafted_tokens = Counter(
            "tandem_edge_speculative_drafted_tokens",
            "Draft tokens sent for verification.",
            registry=r,
        )
        self.accepted_tokens = Counter(
            "tandem_edge_speculative_accepted_tokens",
            "Draft tokens the cloud target kept.",
            registry=r,
        )
        self.verify_rounds = Counter(
            "tandem_edge_speculative_verify_rounds", "Verification round trips.", registry=r
        )
        self.route_decisions = Counter(
            "tandem_edge_route_decisions",
            "Routing decisions, by route and the policy rule that chose it.",
            ["route", "rule"],
            registry=r,
        )
        self.escalations = Counter(
            "tandem_edge_escalations",
            "Edge answers handed to a stronger route midway, by that route.",
            ["to"],
            registry=r,
        )
        self.cloud_fallbacks = Counter(
            "tandem_edge_cloud_fallbacks",
            "Cloud answers the edge finished itself after every worker went away midway.",
            registry=r,
        )
        self.malformed_tool_calls = Counter(
            "tandem_edge_malformed_tool_calls", "Tool-call blocks the parser rejected.", registry=r
        )
        self.ttft = Histogram(
            "tandem_edge_time_to_first_token_seconds",
            "Request arrival to first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tandem_edge_time_per_output_token_seconds",
            "Mean gap between output tokens.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_edge_request_duration_seconds",
            "Request arrival to last token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from ``read`` at scrape time."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def add_counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A counter kept by someone else (the engine), read at scrape time."""
        self.registry.register(_ReadCounter(name, doc, read))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _ReadCounter(Collector):
    """Exposes a monotonic count owned elsewhere as a Prometheus counter."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, value=self._read())
