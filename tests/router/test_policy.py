"""The routing decision: a pure function of the policy and the request's features."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.policy import RequestFeatures, RoutingPolicy, base_model, decide

PLAIN = RequestFeatures(model="m", has_tools=False, prompt_tokens=10)


def test_simple_turn_stays_on_the_edge() -> None:
    decision = decide(RoutingPolicy(), PLAIN)
    assert (decision.route, decision.rule) == ("edge", "default")


@pytest.mark.parametrize(
    ("features", "rule"),
    [
        (RequestFeatures(model="m", has_tools=True, prompt_tokens=10), "tools"),
        (RequestFeatures(model="m", has_tools=False, prompt_tokens=5000), "long-context"),
        (RequestFeatures(model="m@cloud", has_tools=False, prompt_tokens=10), "model-alias"),
        (RequestFeatures(model="tandem-cloud", has_tools=False, prompt_tokens=10), "model-alias"),
        (
            RequestFeatures(model="m", has_tools=False, prompt_tokens=10, route_header="cloud"),
            "header",
        ),
    ],
)
def test_cloud_rules(features: RequestFeatures, rule: str) -> None:
    decision = decide(RoutingPolicy(), features)
    assert (decision.route, decision.rule) == ("cloud", rule)


def test_explicit_edge_beats_tools_and_length() -> None:
    features = RequestFeatures(model="m@edge", has_tools=True, prompt_tokens=5000)
    assert decide(RoutingPolicy(), features).route == "edge"
    header = RequestFeatures(model="m", has_tools=True, prompt_tokens=5000, route_header="edge")
    assert decide(RoutingPolicy(), header).route == "edge"


def test_policy_switches() -> None:
    policy = RoutingPolicy(tools_to_cloud=False, long_context_tokens=8)
    tools = RequestFeatures(model="m", has_tools=True, prompt_tokens=4)
    assert decide(policy, tools).route == "edge"
    assert decide(policy, PLAIN).rule == "long-context"


def test_base_model_strips_route_suffix() -> None:
    assert base_model("smollm2-135m@cloud") == "smollm2-135m"
    assert base_model("smollm2-135m@edge") == "smollm2-135m"
    assert base_model("smollm2-135m") == "smollm2-135m"


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        RoutingPolicy.model_validate({"long_context_tokens": 0, "on_cloud_unavailable": "pray"})
    fields = {e["loc"][0] for e in exc.value.errors()}
    assert fields == {"long_context_tokens", "on_cloud_unavailable"}
