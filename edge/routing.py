"""The edge's side of routing: a request's features, and what this edge has observed.

``router.policy`` decides from features alone; this module computes them from
the OpenAI request and the live state of this edge (queue, fleet, recent cloud
latency, observed speculative acceptance, each tenant's cloud tokens), and
records what finished answers teach it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from edge.api_keys import OPEN, Principal
from edge.fleet_usage import FleetUsage
from edge.generation import GenerationStats
from edge.openai_protocol import ChatCompletionRequest, NamedToolChoice
from router.policy import RequestFeatures, ResponseFormat, ToolChoice

ROUTE_HEADER = "x-tandem-route"
RULE_HEADER = "x-tandem-rule"  # on responses: the policy rule that routed the answer
TENANT_HEADER = "x-tandem-tenant"  # honoured only from API keys that may set it
_LEDGER_BUCKET_S = 60
_LEDGER_WINDOW_S = 3600
_ACCEPTANCE_HALF_LIFE = 20  # answers: recent behaviour counts, old drifts out


class ComplexityScorer(Protocol):
    """The learned complexity classifier (router.classifier), as the edge calls it."""

    def score(self, prompt_token_ids: list[int], *, has_tools: bool, n_messages: int) -> float:
        """P(the edge's answer would not be the cloud's), in [0, 1]."""
        ...


class CloudTokenLedger:
    """Cloud tokens (prompt + completion) per tenant over the last hour, in minute buckets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, deque[tuple[int, int]]] = defaultdict(deque)

    def add(self, tenant: str, tokens: int) -> None:
        minute = int(self._clock() // _LEDGER_BUCKET_S)
        buckets = self._buckets[tenant]
        if buckets and buckets[-1][0] == minute:
            buckets[-1] = (minute, buckets[-1][1] + tokens)
        else:
            buckets.append((minute, tokens))

    def used(self, tenant: str) -> int:
        oldest = int((self._clock() - _LEDGER_WINDOW_S) // _LEDGER_BUCKET_S)
        buckets = self._buckets.get(tenant)
        if not buckets:
            return 0
        while buckets and buckets[0][0] <= oldest:
            buckets.popleft()
        return sum(tokens for _, tokens in buckets)


@dataclass
class Observations:
    """What this edge learned from finished answers, for the policy's live conditions."""

    cloud_ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    acceptance: dict[str, float] = field(default_factory=dict)  # per category, decayed
    ledger: CloudTokenLedger = field(default_factory=CloudTokenLedger)
    edge_service_s: float | None = None  # decayed mean time an edge answer holds a slot

    def edge_wait_ms(self, queue: int, slots: int) -> float | None:
        """Estimated wait of a request joining this edge's queue now."""
        if self.edge_service_s is None:
            return None
        return queue * self.edge_service_s * 1000 / max(1, slots)

    def cloud_latency_ms(self) -> float | None:
        return statistics.median(self.cloud_ttft_ms) if self.cloud_ttft_ms else None

    def record(self, *, route: str, tenant: str, category: str, stats: GenerationStats,
               ttft_s: float | None, elapsed_s: float = 0.0) -> None:  # fmt: skip
        """Learn from one finished answer (``elapsed_s``: arrival to last token)."""
        if route in ("edge", "edge-fallback"):
            service = max(0.0, elapsed_s - stats.queue_s)
            before = self.edge_service_s
            self.edge_service_s = service if before is None else 0.8 * before + 0.2 * service
        if route in ("cloud", "speculative"):
            self.ledger.add(tenant, stats.prompt_tokens + stats.completion_tokens)
        if route == "cloud" and ttft_s is not None:
            self.cloud_ttft_ms.append(ttft_s * 1000)
        if stats.drafted:
            rate = stats.accepted / stats.drafted
            weight = min(1.0, stats.verify_rounds / _ACCEPTANCE_HALF_LIFE)
            before = self.acceptance.get(category)
            self.acceptance[category] = (
                rate if before is None else before + weight * (rate - before)
            )


def category(complexity: float | None) -> str:
    """The bucket speculative acceptance is tracked in: the classifier's score decile."""
    return "all" if complexity is None else f"complexity-{min(9, int(complexity * 10))}"


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice | None:
    if not body.tools:
        return None
    if isinstance(body.tool_choice, NamedToolChoice):
        return "named"
    return body.tool_choice or "auto"


def _response_format(body: ChatCompletionRequest) -> ResponseFormat:
    return body.response_format.type if body.response_format else "text"


def chat_features(
    body: ChatCompletionRequest,
    prompt_tokens: int,
    headers: Mapping[str, str],
    *,
    edge_queue: int,
    cloud_workers: int | None,
    edge_slots: int = 1,
    observations: Observations,
    complexity: float | None = None,
    principal: Principal = OPEN,
    fleet: FleetUsage | None = None,
) -> RequestFeatures:
    """The features of one chat request on this edge, now. The tenant is the API key's
    (the header counts only from keys that may set it)."""
    tenant = principal.tenant_for(headers.get(TENANT_HEADER))
    key = principal.key
    key_budget = key.cloud_tokens_per_hour if key is not None and fleet is not None else None
    return RequestFeatures(
        model=body.model,
        has_tools=bool(body.active_tools()),
        prompt_tokens=prompt_tokens,
        route_header=headers.get(ROUTE_HEADER),
        tool_choice=_tool_choice(body),
        turn_depth=sum(1 for m in body.messages if m.role == "user"),
        max_tokens=body.requested_max_tokens(),
        response_format=_response_format(body),
        tenant=tenant,
        complexity=complexity,
        edge_queue=edge_queue,
        edge_wait_ms=observations.edge_wait_ms(edge_queue, edge_slots),
        cloud_workers=cloud_workers,
        cloud_latency_ms=observations.cloud_latency_ms(),
        speculative_acceptance=observations.acceptance.get(category(complexity)),
        cloud_tokens_used=observations.ledger.used(tenant),
        key_cloud_budget=key_budget,
        key_over_budget=key.over_budget if key is not None else "edge",
        fleet_cloud_tokens_used=fleet.used(tenant) if fleet and key_budget is not None else 0,
    )
