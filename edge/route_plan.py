"""A request's routing decision as one frozen value: the live policy is read once.

``plan_chat`` reads the policy in force exactly once, decides, and copies into a
``RoutePlan`` everything the later steps need from the policy: the route and the
rule, the draft cap, the escalation settings and the cloud-unavailable fallback.
The serving layer (``edge.serving``) gets the plan, never the live policy, so a
revision that lands mid-request cannot split one answer across two revisions:
the decision, the fallback and the escalation all follow the revision the plan
was read from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from edge.api_keys import DEFAULT_TENANT, OPEN, Principal
from edge.errors import CloudBudgetExceededError, ModelNotFoundError
from edge.fleet_usage import FleetUsage
from edge.metrics import EdgeMetrics
from edge.openai_protocol import ChatCompletionRequest
from edge.routing import (
    ComplexityScorer,
    Observations,
    category,
    chat_features,
)
from router.policy import Escalation, Route, RoutingPolicy, base_model, decide

logger = logging.getLogger(__name__)

# Appended to the rule of a constrained request the policy sent to the speculative route.
CONSTRAINED_TO_CLOUD = "+constrained-to-cloud"


@dataclass(frozen=True)
class EdgeLoad:
    """This edge's live load, read when the request is routed."""

    queue: int
    slots: int
    cloud_workers: int | None  # None: not on a mesh


@dataclass(frozen=True)
class RoutePlan:
    """Everything a request's later steps need from the policy, fixed when it was routed."""

    route: Route  # where the policy sends the answer: edge, cloud or speculative
    rule: str  # the rule that sent it there
    revision: int | None  # the store revision the plan was read from (None: file/built-in)
    cloud_unavailable: Literal["edge", "fail"]  # no cloud worker: serve on the edge, or 503
    max_draft_tokens: int | None = None  # speculative route: the policy's cap on drafts
    escalation: Escalation | None = None  # edge route: hand the answer over when unsure
    complexity: float | None = None  # the classifier's score, when the policy read it
    tenant: str = DEFAULT_TENANT
    principal: Principal = OPEN  # who asked: the API key its tokens are charged to

    @property
    def category(self) -> str:
        """The bucket this request's observations are recorded in."""
        return category(self.complexity)


@dataclass(frozen=True)
class PolicySnapshot:
    """The policy in force and its revision, read together."""

    policy: RoutingPolicy
    revision: int | None


def check_model(snapshot: PolicySnapshot, served: str, model: str) -> None:
    """Refuse a model name this edge does not serve (404, with the names it does)."""
    aliases = snapshot.policy.cloud_aliases
    if base_model(model) != served and model not in aliases:
        names = [served, f"{served}@edge", f"{served}@cloud", *aliases]
        raise ModelNotFoundError(
            f"model {model!r} is not served here; available: {', '.join(names)}", param="model"
        )


def plan_chat(
    snapshot: PolicySnapshot,
    body: ChatCompletionRequest,
    prompt: list[int],
    headers: Mapping[str, str],
    *,
    load: EdgeLoad,
    observations: Observations,
    classifier: ComplexityScorer | None,
    metrics: EdgeMetrics,
    principal: Principal = OPEN,
    fleet: FleetUsage | None = None,
) -> RoutePlan:
    """Decide a chat request's route under ``snapshot`` and freeze what follows from it."""
    policy = snapshot.policy
    complexity = _complexity(policy, classifier, body, prompt)
    features = chat_features(
        body,
        len(prompt),
        headers,
        edge_queue=load.queue,
        edge_slots=load.slots,
        cloud_workers=load.cloud_workers,
        observations=observations,
        complexity=complexity,
        principal=principal,
        fleet=fleet,
    )
    decision = decide(policy, features)
    metrics.route_decisions.labels(decision.route, decision.rule).inc()
    if decision.fail_reason is not None:
        raise CloudBudgetExceededError(decision.fail_reason)
    route, rule = decision.route, decision.rule
    constrained = body.output_constraint is not None
    if constrained and route == "speculative":
        # Drafts are verified against the unconstrained target: a constrained answer
        # would not be exactly the cloud's. It goes to the cloud, and the rule says so.
        route, rule = "cloud", f"{rule}{CONSTRAINED_TO_CLOUD}"
    # A hand-over mid-answer would restart the grammar: constrained answers stay put.
    escalates = (
        route == "edge" and decision.escalate and policy.escalation.enabled and not constrained
    )
    return RoutePlan(
        route=route,
        rule=rule,
        revision=snapshot.revision,
        cloud_unavailable=policy.fallbacks.cloud_unavailable,
        max_draft_tokens=decision.max_draft_tokens,
        escalation=policy.escalation if escalates else None,
        complexity=complexity,
        tenant=features.tenant,
        principal=principal,
    )


def _complexity(
    policy: RoutingPolicy,
    classifier: ComplexityScorer | None,
    body: ChatCompletionRequest,
    prompt: list[int],
) -> float | None:
    """The classifier's score, computed only when the policy reads it."""
    if not policy.uses_complexity or classifier is None:
        return None
    try:
        return classifier.score(
            prompt, has_tools=bool(body.active_tools()), n_messages=len(body.messages)
        )
    except ValueError as exc:  # e.g. a classifier trained for another model's vocabulary
        logger.warning("complexity not scored: %s", exc)
        return None
