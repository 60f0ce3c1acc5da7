"""The serving layer on a real llama.cpp engine: one answer follows one policy revision.

The edge's state is built as the daemon builds it (``edge.state.build_state``,
bundled GGUF, no mesh), the request is planned from the policy in force, and a
new revision is applied while the answer streams. The whole answer, its
escalation and the fallback it needs, must follow the revision it was planned
under; the next request follows the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest

from edge import serving
from edge.errors import ServiceUnavailableError
from edge.generation import FinishEvent, TokenEvent
from edge.openai_protocol import ChatCompletionRequest
from edge.route_plan import RoutePlan, plan_chat
from edge.settings import EdgeSettings
from edge.state import EdgeState, build_state
from router.policy import RoutingPolicy
from router.store import StoredPolicy

# Revision 1: an edge answer escalates to the cloud after 3 tokens; with no cloud, the
# edge finishes it (edge-fallback).
REVISION_1 = """
escalation: {enabled: true, window_tokens: 1, min_mean_logprob: 0, after_tokens: 3, route: cloud}
fallbacks: {cloud_unavailable: edge}
"""
# Revision 2: the same hand-over must fail (503) when no cloud is there.
REVISION_2 = """
escalation: {enabled: true, window_tokens: 1, min_mean_logprob: 0, after_tokens: 3, route: cloud}
fallbacks: {cloud_unavailable: fail}
"""


@pytest.fixture(scope="module")
def state() -> Iterator[EdgeState]:
    state = build_state(EdgeSettings(slots=1))
    yield state
    asyncio.run(state.engine.close())


def _stored(revision: int, text: str) -> StoredPolicy:
    return StoredPolicy(revision, text, "test", "", None, RoutingPolicy.from_yaml(text))


async def _guard(work: Awaitable[Any]) -> Any:
    return await work


def _plan(state: EdgeState, body: ChatCompletionRequest, prompt: list[int]) -> RoutePlan:
    return plan_chat(
        state.policy_snapshot(), body, prompt, {}, load=state.load(),
        observations=state.observations, classifier=state.classifier, metrics=state.metrics,
    )  # fmt: skip


@pytest.mark.timeout(120)
async def test_a_revision_applied_mid_answer_does_not_change_that_answer(
    state: EdgeState,
) -> None:
    assert state.live.apply(_stored(1, REVISION_1))
    body = ChatCompletionRequest.model_validate(
        {
            "model": state.model_id,
            "messages": [{"role": "user", "content": "Describe the sea in two sentences."}],
            "temperature": 0,
            "max_tokens": 24,
        }
    )
    prompt = state.prompts.chat_prompt(body)
    call = serving.Call(session_id=None, guard=_guard)
    plan = _plan(state, body, prompt.token_ids)
    assert (plan.route, plan.revision, plan.cloud_unavailable) == ("edge", 1, "edge")

    served = await serving.serve_chat(state, call, plan, body, prompt)
    first = await anext(served.events)
    assert isinstance(first, TokenEvent)
    assert state.live.apply(_stored(2, REVISION_2))  # lands while the answer streams

    tokens = len(first.token_ids)
    finish: FinishEvent | None = None
    async for event in served.events:
        if isinstance(event, FinishEvent):
            finish = event
        else:
            tokens += len(event.token_ids)
    assert finish is not None and finish.stats.handover is not None
    # Revision 1's escalation and fallback, although revision 2 said to fail.
    assert served.route == "edge"
    assert finish.stats.handover.to == "edge-fallback"
    assert finish.stats.handover.at_token == 3
    assert finish.stats.completion_tokens == tokens > 3

    # The next request is planned under revision 2, and its hand-over fails as it says.
    plan_2 = _plan(state, body, prompt.token_ids)
    assert (plan_2.revision, plan_2.cloud_unavailable) == (2, "fail")
    served_2 = await serving.serve_chat(state, call, plan_2, body, prompt)
    with pytest.raises(ServiceUnavailableError):
        async for _ in served_2.events:
            pass
    assert plan_2.escalation is not None and plan_2.escalation.route == "cloud"


def test_a_constrained_answer_is_planned_without_escalation(state: EdgeState) -> None:
    """A hand-over mid-answer would restart the grammar: the plan keeps it on its route."""
    assert state.live.apply(_stored(3, REVISION_1))
    free = {
        "model": state.model_id,
        "messages": [{"role": "user", "content": "Describe the sea."}],
    }
    body = ChatCompletionRequest.model_validate(free)
    constrained = ChatCompletionRequest.model_validate(
        {**free, "response_format": {"type": "json_object"}}
    )
    assert _plan(state, body, state.prompts.chat_tokens(body)).escalation is not None
    plan = _plan(state, constrained, state.prompts.chat_tokens(constrained))
    assert (plan.route, plan.escalation) == ("edge", None)
