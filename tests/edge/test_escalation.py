"""Mid-answer escalation: the confidence rule, and an escalated answer continuing as one."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.escalation import ConfidenceWatch
from mesh.sampling import top_logprobs
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess


def test_top_logprobs_are_log_softmax_most_probable_first() -> None:
    logits = np.array([2.0, 1.0, -1.0, 1000.0 - 1000.0], dtype=np.float32)
    expected = logits - math.log(float(np.exp(logits).sum()))
    for token in range(4):
        assert top_logprobs(logits, token, 0)[0] == pytest.approx(expected[token], abs=1e-5)
    chosen, ids, values = top_logprobs(logits, 2, 3)
    assert ids == [0, 1, 3]
    assert values == pytest.approx([expected[0], expected[1], expected[3]], abs=1e-5)
    assert chosen == pytest.approx(expected[2], abs=1e-5)
    huge = np.array([1000.0, 999.0], dtype=np.float32)  # no overflow
    assert top_logprobs(huge, 1, 0)[0] == pytest.approx(-1.3133, abs=1e-3)
    assert top_logprobs(huge, 1, 5)[1] == [0, 1]  # k beyond the vocabulary: all of it


def test_watch_fires_on_a_low_window_mean_only_after_the_warmup() -> None:
    watch = ConfidenceWatch(window=3, min_mean_logprob=-2.0, after_tokens=4)
    confident = [watch.observe(-0.1, produced=i) for i in range(4)]
    assert confident == [False] * 4
    # Two unsure tokens: the mean of the last 3 is (-0.1 - 3 - 3) / 3 = -2.03 < -2.0.
    assert watch.observe(-3.0, produced=4) is False  # mean (-0.1-0.1-3)/3 = -1.07
    assert watch.observe(-3.0, produced=5) is True
    assert watch.triggered_mean == pytest.approx(-6.1 / 3)
    early = ConfidenceWatch(window=1, min_mean_logprob=-1.0, after_tokens=10)
    assert early.observe(-9.0, produced=3) is False  # before after_tokens, never


ALWAYS_ESCALATE = """
escalation:
  enabled: true
  window_tokens: 1
  min_mean_logprob: 0     # any token's logprob is below 0: escalate at after_tokens
  after_tokens: 5
  route: speculative
"""


@pytest.fixture(scope="module", params=["batched", "slots"])
def escalating_edge(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[EdgeProcess]:
    policy = tmp_path_factory.mktemp("policy") / "escalate.yaml"
    policy.write_text(ALWAYS_ESCALATE)
    with EdgeProcess(policy_file=Path(policy), batching=request.param) as edge:
        yield edge


def _chat(edge: EdgeProcess, stream: bool, **extra: Any) -> tuple[str, dict[str, Any], int]:
    client = edge.client()
    kwargs: dict[str, Any] = dict(
        model=DEFAULT_PAIR,
        messages=[{"role": "user", "content": "Describe the sea in two sentences."}],
        max_tokens=24,
        temperature=0,
        **extra,
    )
    if not stream:
        answer = client.chat.completions.create(**kwargs)
        assert answer.usage is not None
        usage = answer.usage.model_extra or {}
        return (
            answer.choices[0].message.content or "",
            usage["tandem"],
            answer.usage.completion_tokens,
        )
    text, tandem, completion = "", {}, 0
    for chunk in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tandem = (chunk.usage.model_extra or {})["tandem"]
            completion = chunk.usage.completion_tokens
    return text, tandem, completion


@pytest.mark.parametrize("stream", [False, True])
def test_an_escalated_answer_continues_the_same_answer(
    escalating_edge: EdgeProcess, stream: bool
) -> None:
    # Asked for the edge explicitly: no escalation (the client chose the route).
    plain, plain_usage, plain_tokens = _chat(
        escalating_edge, stream, extra_headers={"x-tandem-route": "edge"}
    )
    assert plain_usage.get("escalation") is None
    # Routed by the policy: escalates after 5 tokens. No cloud here, so the speculative
    # route falls back to the edge, which continues from the 5 tokens already sent:
    # at temperature 0 the whole answer must equal the uninterrupted one.
    text, usage, tokens = _chat(escalating_edge, stream)
    assert usage["escalation"]["at_token"] == 5
    assert usage["escalation"]["to"] == "edge-fallback"
    assert usage["escalation"]["mean_logprob"] < 0
    if escalating_edge.options["batching"] == "slots":
        # One context per request, its prefix restored exactly: the same answer, token for
        # token.
        assert text == plain and tokens == plain_tokens
    else:
        # The batched engine re-evaluates the sent tokens' last one in the shared cache,
        # whose logits differ from the uninterrupted decoding's at near-ties
        # (docs/architecture.md), so the continuation is checked as one answer, not equal.
        assert tokens > 5 and len(text) > 0
    metrics = escalating_edge.metrics()
    assert metrics['tandem_edge_escalations_total{to="edge-fallback"}'] >= 1
