"""The routing policy and the decision function: which route serves a request.

This is the first, fixed-shape policy (issue 3): tools, long context, or an
explicit ask go to the cloud; the rest stays on the edge. The decision is a
pure function of the policy and the request's features, so it can be tested
and explained without any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Route = Literal["edge", "cloud", "speculative"]
CLOUD_SUFFIX = "@cloud"
EDGE_SUFFIX = "@edge"
SPECULATIVE_SUFFIX = "@speculative"


class RoutingPolicy(BaseModel):
    """What goes to the cloud, and what happens when the cloud is not there."""

    model_config = ConfigDict(extra="forbid")

    tools_to_cloud: bool = Field(True, description="requests offering tools go to the cloud")
    long_context_tokens: int = Field(
        1024, ge=1, description="prompts at least this long go to the cloud"
    )
    cloud_aliases: list[str] = Field(
        default_factory=lambda: ["tandem-cloud"],
        description=f"model names that ask for the cloud (also any '<model>{CLOUD_SUFFIX}')",
    )
    on_cloud_unavailable: Literal["edge-fallback", "fail"] = Field(
        "edge-fallback", description="serve on the edge (marked) or answer 503"
    )


@dataclass(frozen=True)
class RequestFeatures:
    """What the router looks at in a request."""

    model: str
    has_tools: bool
    prompt_tokens: int
    route_header: str | None = None  # x-tandem-route from the client


@dataclass(frozen=True)
class RouteDecision:
    """The chosen route and the rule that chose it."""

    route: Route
    rule: str
    reason: str


def base_model(model: str) -> str:
    """The served model name without a route suffix."""
    for suffix in (CLOUD_SUFFIX, EDGE_SUFFIX, SPECULATIVE_SUFFIX):
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


def decide(policy: RoutingPolicy, f: RequestFeatures) -> RouteDecision:
    """Pick the route for a request; the first matching rule wins."""
    if f.route_header == "edge":
        return RouteDecision("edge", "header", "x-tandem-route: edge")
    if f.route_header == "cloud":
        return RouteDecision("cloud", "header", "x-tandem-route: cloud")
    if f.route_header == "speculative":
        return RouteDecision("speculative", "header", "x-tandem-route: speculative")
    if f.model.endswith(SPECULATIVE_SUFFIX):
        return RouteDecision("speculative", "model-alias", f"model {f.model!r} asks for it")
    if f.model.endswith(EDGE_SUFFIX):
        return RouteDecision("edge", "model-alias", f"model {f.model!r} asks for the edge")
    if f.model.endswith(CLOUD_SUFFIX) or f.model in policy.cloud_aliases:
        return RouteDecision("cloud", "model-alias", f"model {f.model!r} asks for the cloud")
    if policy.tools_to_cloud and f.has_tools:
        return RouteDecision("cloud", "tools", "the request offers tools")
    if f.prompt_tokens >= policy.long_context_tokens:
        return RouteDecision(
            "cloud",
            "long-context",
            f"{f.prompt_tokens} prompt tokens >= {policy.long_context_tokens}",
        )
    return RouteDecision("edge", "default", "simple turn")
