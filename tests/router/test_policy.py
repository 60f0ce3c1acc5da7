"""The routing decision: a pure function of the policy and the request's features."""

from __future__ import annotations

import functools

import pytest

from router.policy import (
    PolicyError,
    RequestFeatures,
    RoutingPolicy,
    base_model,
    decide,
    explain,
)

PLAIN = RequestFeatures(model="m", prompt_tokens=10)


def policy(yaml_text: str) -> RoutingPolicy:
    return RoutingPolicy.from_yaml(yaml_text)


def test_simple_turn_stays_on_the_edge() -> None:
    decision = decide(RoutingPolicy(), PLAIN)
    assert (decision.route, decision.rule) == ("edge", "default")


@pytest.mark.parametrize(
    ("features", "rule"),
    [
        (RequestFeatures(model="m", has_tools=True, prompt_tokens=10), "tools"),
        (RequestFeatures(model="m", prompt_tokens=5000), "long-context"),
        (RequestFeatures(model="m@cloud", prompt_tokens=10), "model-alias"),
        (RequestFeatures(model="tandem-cloud", prompt_tokens=10), "model-alias"),
        (RequestFeatures(model="m", prompt_tokens=10, route_header="cloud"), "header"),
    ],
)
def test_default_policy_cloud_rules(features: RequestFeatures, rule: str) -> None:
    decision = decide(RoutingPolicy(), features)
    assert (decision.route, decision.rule) == ("cloud", rule)


def test_explicit_edge_beats_tools_and_length() -> None:
    features = RequestFeatures(model="m@edge", has_tools=True, prompt_tokens=5000)
    assert decide(RoutingPolicy(), features).route == "edge"
    header = RequestFeatures(model="m", has_tools=True, prompt_tokens=5000, route_header="edge")
    assert decide(RoutingPolicy(), header).route == "edge"


def test_client_overrides_can_be_switched_off() -> None:
    p = policy("client_overrides: false\n")
    assert decide(p, RequestFeatures(model="m", route_header="cloud")).rule == "default"
    assert decide(p, RequestFeatures(model="m@cloud")).route == "edge"


def test_first_matching_rule_wins_in_order() -> None:
    p = policy(
        """
rules:
  - {name: deep, when: {turn_depth_at_least: 3}, route: speculative, max_draft_tokens: 6}
  - {name: json, when: {response_format: [json_object, json_schema]}, route: cloud}
  - {name: short-answers, when: {max_tokens_below: 32}, route: edge}
default: {route: cloud}
"""
    )
    deep_json = RequestFeatures(model="m", turn_depth=5, response_format="json_object")
    d = decide(p, deep_json)
    assert (d.route, d.rule, d.max_draft_tokens) == ("speculative", "deep", 6)
    assert decide(p, RequestFeatures(model="m", response_format="json_schema")).rule == "json"
    assert decide(p, RequestFeatures(model="m", max_tokens=16)).rule == "short-answers"
    # max_tokens unknown: a bound on it cannot hold
    assert decide(p, RequestFeatures(model="m")).route == "cloud"


@pytest.mark.parametrize(
    ("when", "features", "matches"),
    [
        ("{tenant: ['acme-*']}", RequestFeatures(model="m", tenant="acme-prod"), True),
        ("{tenant: ['acme-*']}", RequestFeatures(model="m", tenant="other"), False),
        ("{model: ['gpt-4*']}", RequestFeatures(model="gpt-4o"), True),
        ("{tool_choice: [required, named]}", RequestFeatures(model="m", tool_choice="auto"), False),
        ("{complexity_at_least: 0.6}", RequestFeatures(model="m", complexity=0.7), True),
        ("{complexity_at_least: 0.6}", RequestFeatures(model="m", complexity=None), False),
        ("{complexity_below: 0.6}", RequestFeatures(model="m", complexity=0.6), False),
        ("{edge_queue_at_least: 4}", RequestFeatures(model="m", edge_queue=4), True),
        ("{cloud_workers_below: 1}", RequestFeatures(model="m", cloud_workers=0), True),
        (
            "{cloud_latency_ms_at_least: 500}",
            RequestFeatures(model="m", cloud_latency_ms=90),
            False,
        ),
        (
            "{speculative_acceptance_below: 0.5}",
            RequestFeatures(model="m", speculative_acceptance=0.3),
            True,
        ),
    ],
)
def test_conditions(when: str, features: RequestFeatures, matches: bool) -> None:
    p = policy(f"rules: [{{name: r, when: {when}, route: cloud}}]\n")
    assert (decide(p, features).rule == "r") is matches


def test_budget_moves_cloud_traffic_to_the_edge_or_refuses() -> None:
    p = policy(
        """
budgets:
  - {tenant: 'free-*', cloud_tokens_per_hour: 1000}
  - {tenant: 'strict', cloud_tokens_per_hour: 10, over_budget: fail}
"""
    )
    tools = functools.partial(RequestFeatures, model="m", has_tools=True)
    under = decide(p, tools(tenant="free-1", cloud_tokens_used=999))
    assert under.route == "cloud"
    over = decide(p, tools(tenant="free-1", cloud_tokens_used=1000))
    assert (over.route, over.rule) == ("edge", "budget")
    refused = decide(p, tools(tenant="strict", cloud_tokens_used=10))
    assert refused.fail_reason is not None and "strict" in refused.fail_reason


def test_an_api_keys_fleet_budget_moves_or_refuses_like_a_policy_budget() -> None:
    tools = functools.partial(RequestFeatures, model="m", has_tools=True, tenant="acme")
    p = RoutingPolicy()
    assert decide(p, tools(key_cloud_budget=100, fleet_cloud_tokens_used=99)).route == "cloud"
    over = decide(p, tools(key_cloud_budget=100, fleet_cloud_tokens_used=100))
    assert (over.route, over.rule) == ("edge", "budget") and "over the fleet" in over.reason
    refused = decide(
        p, tools(key_cloud_budget=0, key_over_budget="fail", fleet_cloud_tokens_used=0)
    )
    assert refused.fail_reason is not None and "acme" in refused.fail_reason


def test_overloaded_edge_sends_work_to_a_healthy_cloud() -> None:
    p = RoutingPolicy()
    busy = RequestFeatures(model="m", edge_queue=8, cloud_workers=2)
    assert (decide(p, busy).route, decide(p, busy).rule) == ("cloud", "edge-overloaded")
    no_cloud = RequestFeatures(model="m", edge_queue=8, cloud_workers=0)
    assert decide(p, no_cloud).route == "edge"
    asked = RequestFeatures(model="m", edge_queue=8, cloud_workers=2, route_header="edge")
    assert decide(p, asked).route == "edge"  # the client asked; it waits
    off = policy("fallbacks: {edge_overloaded: null}\n")
    assert decide(off, busy).route == "edge"


def test_explain_names_the_failed_conditions() -> None:
    p = RoutingPolicy()
    result = explain(p, RequestFeatures(model="m", prompt_tokens=10))
    assert [t.rule for t in result.trace] == ["tools", "long-context"]
    assert not any(t.matched for t in result.trace)
    assert result.trace[1].failed == ["prompt_tokens_at_least: 1024 (request: 10)"]
    hit = explain(p, RequestFeatures(model="m", has_tools=True))
    assert hit.decision.rule == "tools" and hit.trace[-1].matched


def test_yaml_round_trip_keeps_everything() -> None:
    text = """
client_overrides: false
rules:
  - {name: spec, when: {complexity_at_least: 0.5, tenant: [a]}, route: speculative,
     max_draft_tokens: 4}
  - {name: local, when: {}, route: edge, escalate: false}
fallbacks: {cloud_unavailable: fail, edge_overloaded: null}
escalation: {enabled: true, window_tokens: 4, min_mean_logprob: -1.5, route: cloud}
slo: {ttft_p95_ms: 850}
budgets: [{tenant: '*', cloud_tokens_per_hour: 5}]
"""
    original = policy(text)
    assert RoutingPolicy.from_yaml(original.to_yaml()) == original
    assert original.fallbacks.edge_overloaded is None  # null survives, not the default
    assert original.uses_complexity and not RoutingPolicy().uses_complexity


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("rules: [{name: a, route: moon}]", "rules.0.route"),
        ("rules: [{name: a, route: edge, when: {prompt_tokens_below: -1}}]", "rules.0.when"),
        ("rules: [{name: a, route: edge, when: {colour: red}}]", "rules.0.when.colour"),
        ("rules: [{name: a, route: edge, max_draft_tokens: 4}]", "rules.0"),
        ("rules: [{name: a, route: edge}, {name: a, route: cloud}]", "two rules are named 'a'"),
        ("fallbacks: {cloud_unavailable: pray}", "fallbacks.cloud_unavailable"),
        ("escalation: {min_mean_logprob: 1}", "escalation.min_mean_logprob"),
        ("version: 2", "version"),
        ("rules: [", "not valid YAML"),
        ("- a list", "a YAML mapping"),
    ],
)
def test_validation_errors_point_at_the_field(text: str, where: str) -> None:
    with pytest.raises(PolicyError) as exc:
        RoutingPolicy.from_yaml(text)
    assert where in str(exc.value)


def test_base_model_strips_route_suffix() -> None:
    assert base_model("smollm2-135m@cloud") == "smollm2-135m"
    assert base_model("smollm2-135m@speculative") == "smollm2-135m"
    assert base_model("smollm2-135m") == "smollm2-135m"


def test_an_edge_whose_queue_wait_breaks_the_ttft_slo_counts_as_overloaded() -> None:
    p = policy("slo: {ttft_p95_ms: 850}\n")
    slow = RequestFeatures(model="m", edge_queue=2, edge_wait_ms=1200, cloud_workers=1)
    d = decide(p, slow)
    assert (d.route, d.rule) == ("cloud", "edge-overloaded") and "1200 ms" in d.reason
    fine = RequestFeatures(model="m", edge_queue=2, edge_wait_ms=400, cloud_workers=1)
    assert decide(p, fine).route == "edge"
    assert decide(RoutingPolicy(), slow).route == "edge"  # no SLO, short queue: stays
    asked = RequestFeatures(model="m@edge", edge_queue=9, edge_wait_ms=9e9, cloud_workers=1)
    assert decide(p, asked).route == "edge"
