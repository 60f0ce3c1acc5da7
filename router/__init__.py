"""Tandem router: the routing policy, its store in NATS KV, and the decision of where a
request runs."""

from router.errors import (
    ClassifierError,
    ClassifierInputError,
    InvalidRevisionError,
    PolicyBucketNotFoundError,
    PolicyConflictError,
    PolicyError,
    PolicyStoreError,
    RevisionNotFoundError,
    RouterError,
)
from router.policy import (
    Explanation,
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
    "ClassifierError",
    "ClassifierInputError",
    "Explanation",
    "InvalidRevisionError",
    "PolicyBucketNotFoundError",
    "PolicyConflictError",
    "PolicyError",
    "PolicyStoreError",
    "RequestFeatures",
    "RevisionNotFoundError",
    "Route",
    "RouteDecision",
    "RouterError",
    "RoutingPolicy",
    "Rule",
    "base_model",
    "decide",
    "explain",
]
