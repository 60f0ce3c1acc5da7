"""Tandem router: the routing policy, its store in NATS KV, and the decision of where a
request runs."""

from router.policy import (
    Explanation,
    PolicyError,
    RequestFeatures,
    Route,
    RouteDecision,
    RoutingPolicy,
    Rule,
    base_model,
    decide,
    explain,
)

__all__ = [
    "Explanation",
    "PolicyError",
    "RequestFeatures",
    "Route",
    "RouteDecision",
    "RoutingPolicy",
    "Rule",
    "base_model",
    "decide",
    "explain",
]
