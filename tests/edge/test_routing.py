"""Request features for the router, and what the edge learns from finished answers."""

from __future__ import annotations

from typing import Any

import pytest

from edge.generation import GenerationStats
from edge.openai_protocol import ChatCompletionRequest
from edge.routing import CloudTokenLedger, Observations, category, chat_features

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def body(**fields: Any) -> ChatCompletionRequest:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return ChatCompletionRequest.model_validate({**base, **fields})


def features(b: ChatCompletionRequest, headers: dict[str, str] | None = None, **live: Any) -> Any:
    live.setdefault("edge_queue", 0)
    live.setdefault("cloud_workers", 1)
    live.setdefault("observations", Observations())
    return chat_features(b, 42, headers or {}, **live)


def test_request_shape_features() -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    f = features(
        body(
            messages=turns,
            tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "f"}},
            max_completion_tokens=64,
            response_format={"type": "json_object"},
            temperature=0,
        ),
        {"x-tandem-tenant": "acme", "x-tandem-route": "cloud"},
    )
    assert (f.has_tools, f.tool_choice, f.turn_depth) == (True, "named", 2)
    assert (f.max_tokens, f.response_format) == (64, "json_object")
    assert (f.tenant, f.route_header, f.prompt_tokens) == ("acme", "cloud", 42)
    plain = features(body())
    assert (plain.has_tools, plain.tool_choice, plain.tenant) == (False, None, "default")
    assert plain.response_format == "text" and plain.max_tokens is None
    # tool_choice "none" hides the tools from the model, so the request has none
    assert features(body(tools=[TOOL], tool_choice="none")).has_tools is False


def test_ledger_counts_the_last_hour_per_tenant() -> None:
    now = [0.0]
    ledger = CloudTokenLedger(clock=lambda: now[0])
    ledger.add("a", 100)
    now[0] = 1800
    ledger.add("a", 50)
    ledger.add("b", 7)
    assert (ledger.used("a"), ledger.used("b"), ledger.used("c")) == (150, 7, 0)
    now[0] = 3700  # the first minute's tokens are over an hour old
    assert ledger.used("a") == 50


def test_observations_feed_the_live_features() -> None:
    seen = Observations()
    cloud = GenerationStats(prompt_tokens=30, completion_tokens=10)
    seen.record(route="cloud", tenant="t", category="all", stats=cloud, ttft_s=0.2)
    seen.record(route="cloud", tenant="t", category="all", stats=cloud, ttft_s=0.4)
    seen.record(route="edge", tenant="t", category="all", stats=cloud, ttft_s=0.01)
    spec = GenerationStats(prompt_tokens=5, completion_tokens=5, drafted=10, accepted=4,
                           verify_rounds=40)  # fmt: skip
    seen.record(route="speculative", tenant="t", category="complexity-3", stats=spec, ttft_s=0.1)
    f = features(body(), {"x-tandem-tenant": "t"}, observations=seen, complexity=0.35)
    assert f.cloud_latency_ms == pytest.approx(300)  # median of cloud answers only
    assert f.cloud_tokens_used == 40 + 40 + 10  # cloud and speculative, not edge
    assert f.speculative_acceptance == pytest.approx(0.4)
    assert features(body(), observations=seen).speculative_acceptance is None  # other category


def test_category_buckets_the_complexity_score() -> None:
    assert category(None) == "all"
    assert (category(0.0), category(0.35), category(1.0)) == (
        "complexity-0",
        "complexity-3",
        "complexity-9",
    )


def test_edge_wait_estimate_from_observed_service_times() -> None:
    seen = Observations()
    assert seen.edge_wait_ms(queue=3, slots=1) is None  # nothing observed yet
    answer = GenerationStats(queue_s=0.5)
    seen.record(route="edge", tenant="t", category="all", stats=answer, ttft_s=0.6, elapsed_s=2.5)
    assert seen.edge_service_s == pytest.approx(2.0)  # queueing is not service
    assert seen.edge_wait_ms(queue=3, slots=2) == pytest.approx(3000)
    assert features(body(), observations=seen, edge_queue=4).edge_wait_ms == pytest.approx(8000)
