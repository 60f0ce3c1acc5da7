"""Tandem router: the routing policy and the decision of where a request runs."""

from router.policy import (
    RequestFeatures,
    Route,
    RouteDecision,
    RoutingPolicy,
    base_model,
    decide,
)

__all__ = ["RequestFeatures", "Route", "RouteDecision", "RoutingPolicy", "base_model", "decide"]
