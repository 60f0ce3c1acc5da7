"""logprobs / top_logprobs and ``n`` on the edge route, through the openai client.

The edge computes logprobs from the logits llama.cpp sampled from (the model's raw
distribution, as vLLM's default ``raw_logprobs``), so at temperature 0 the chosen
token is the most probable one and its logprob is the top-1's. Assertions compare
within one answer; across requests prefix reuse may round logits differently.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

EDGE = {"x-tandem-route": "edge"}
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def _check_entries(entries: list[Any], top: int) -> None:
    """Each entry is OpenAI-shaped: bytes spell the token, alternatives sorted, a distribution."""
    for entry in entries:
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == top
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert entry.logprob <= values[0] + 1e-6 if values else True


def test_greedy_logprobs_name_the_most_probable_token(edge: EdgeProcess) -> None:
    answer = edge.client().chat.completions.create(
        model=DEFAULT_PAIR, messages=HELLO, max_tokens=16, temperature=0,
        logprobs=True, top_logprobs=5, extra_headers=EDGE,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    _check_entries(entries, 5)
    for entry in entries:  # greedy: the chosen token is the top-1
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
    spelled = b"".join(bytes(e.bytes) for e in entries).decode()
    assert spelled == choice.message.content


def test_logprobs_stream_with_their_tokens_and_follow_a_constraint(edge: EdgeProcess) -> None:
    stream = edge.client().chat.completions.create(
        model=DEFAULT_PAIR, messages=HELLO, max_tokens=24, temperature=0, logprobs=True,
        top_logprobs=2, stream=True, stream_options={"include_usage": True},
        response_format={"type": "json_object"}, extra_headers=EDGE,
    )  # fmt: skip
    entries, content, usage = [], "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                entries.extend(choice.logprobs.content)
    assert usage is not None and len(entries) == usage.completion_tokens
    _check_entries(entries, 2)
    # Under the grammar the chosen token need not be the model's top-1, but it is a token
    # of the JSON text, in order.
    assert content.startswith("{")
    assert b"".join(bytes(e.bytes) for e in entries).decode() == content


def test_n_choices_are_indexed_and_their_usage_summed(edge: EdgeProcess) -> None:
    answer = edge.client().chat.completions.create(
        model=DEFAULT_PAIR, messages=HELLO, max_tokens=8, temperature=1.0, seed=11, n=3,
        logprobs=True, extra_headers=EDGE,
    )  # fmt: skip
    assert [c.index for c in answer.choices] == [0, 1, 2]
    per_choice = [len(c.logprobs.content) for c in answer.choices]  # one entry per token
    assert answer.usage.completion_tokens == sum(per_choice)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + sum(per_choice)


def test_each_choice_samples_with_its_own_seed() -> None:
    """Choice i of a seeded request draws with seed + i, so it repeats as a request of its
    own with that seed. Exact on the slot engine, where every choice is evaluated alone;
    the batched engine decodes the choices in one step, whose logits differ from a lone
    request's by up to ~0.5 (docs/architecture.md), so there a seeded answer repeats only
    in a like batch, as in vLLM."""
    with EdgeProcess(batching="slots", slots=1) as slots_edge:
        client = slots_edge.client()
        answer = client.chat.completions.create(
            model=DEFAULT_PAIR, messages=HELLO, max_tokens=8, temperature=1.0, seed=11, n=3,
            extra_headers=EDGE,
        )  # fmt: skip
        again = client.chat.completions.create(
            model=DEFAULT_PAIR, messages=HELLO, max_tokens=8, temperature=1.0, seed=12, n=1,
            extra_headers=EDGE,
        )  # fmt: skip
    assert again.choices[0].message.content == answer.choices[1].message.content


def test_n_streams_interleaved_with_one_summed_usage(edge: EdgeProcess) -> None:
    stream = edge.client().chat.completions.create(
        model=DEFAULT_PAIR, messages=HELLO, max_tokens=6, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True}, extra_headers=EDGE,
    )  # fmt: skip
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1] and sorted(finishes) == [0, 1]
    assert usage is not None and usage.completion_tokens == 12  # 6 + 6: both hit max_tokens
    assert set(finishes.values()) == {"length"}


def test_text_completions_have_the_legacy_logprobs_shape(edge: EdgeProcess) -> None:
    answer = edge.client().completions.create(
        model=DEFAULT_PAIR, prompt="The capital of France is", max_tokens=5, temperature=0,
        logprobs=3, n=2,
    )  # fmt: skip
    assert len(answer.choices) == 2
    lp = answer.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == answer.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-6)
        assert token in top or len(top) < 3  # greedy: the chosen token is among the top


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 9}, "n"),  # over the edge's bound (EdgeSettings.max_n, 8)
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ],
)
def test_bad_logprobs_and_n_are_400s_naming_the_field(
    edge: EdgeProcess, extra: dict[str, Any], param: str
) -> None:
    body = {"model": DEFAULT_PAIR, "messages": HELLO, **extra}
    response = httpx.post(f"{edge.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]
