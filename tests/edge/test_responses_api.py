"""The Responses API (``/v1/responses``) on the edge route, through the official openai client.

Greedy answers of the default 135M model: the tests check shapes, the event
sequence and validity (JSON that follows its schema, calls whose arguments
parse), not wording.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

EDGE = {"x-tandem-route": "edge"}
GREEDY: dict[str, Any] = {"model": DEFAULT_PAIR, "temperature": 0, "extra_headers": EDGE}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
MESSAGE_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_EVENTS = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


def _collapse(types: list[str]) -> list[str]:
    """Event types with runs of text deltas folded into one."""
    out: list[str] = []
    for kind in types:
        if not (kind == "response.output_text.delta" and out and out[-1] == kind):
            out.append(kind)
    return out


def _streamed(edge: EdgeProcess, **kwargs: Any) -> tuple[list[Any], Response]:
    """Every event of a streamed response (``stream=True``), and the final response."""
    events = list(edge.client().responses.create(stream=True, **GREEDY, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.id == events[0].response.id
    return events, final


def _calls(response: Response) -> list[ResponseFunctionToolCall]:
    return [item for item in response.output if item.type == "function_call"]


def test_a_text_response_has_a_message_usage_and_the_route(edge: EdgeProcess) -> None:
    raw = edge.client().responses.with_raw_response.create(
        input="Write one sentence about the sea.",
        instructions="You answer briefly.",
        max_output_tokens=48,
        metadata={"case": "text"},
        **GREEDY,
    )
    response = raw.parse()
    assert raw.headers["x-tandem-route"] == "edge" and raw.headers["x-tandem-rule"]
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.instructions == "You answer briefly." and response.metadata == {"case": "text"}
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and response.output_text.strip()
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert (usage.model_extra or {})["tandem"]["route"] == "edge"
    stored = edge.client().responses.retrieve(response.id)
    assert stored.id == response.id and stored.output_text == response.output_text


def test_max_output_tokens_makes_an_incomplete_response(edge: EdgeProcess) -> None:
    response = edge.client().responses.create(
        input="Tell me a long story about a dragon.", max_output_tokens=4, **GREEDY
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


def test_a_streamed_text_response_follows_the_documented_event_sequence(
    edge: EdgeProcess,
) -> None:
    events, final = _streamed(edge, input="Write one sentence about the sea.", max_output_tokens=48)
    types = [e.type for e in events]
    assert _collapse(types[2:-1]) == MESSAGE_EVENTS
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert deltas.strip() and deltas == done.text == final.output_text
    assert final.usage is not None and final.usage.output_tokens > 0
    assert final.output[0].id == events[2].item.id
    assert edge.client().responses.retrieve(final.id).output_text == deltas


def test_the_stream_helper_gives_the_final_response(edge: EdgeProcess) -> None:
    """The client's helper accumulates the events and needs ``response.completed``."""
    with edge.client().responses.stream(
        input="What is 2+2?", max_output_tokens=64, **GREEDY
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert text and final.output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_follows_the_schema(edge: EdgeProcess, stream: bool) -> None:
    request: dict[str, Any] = {
        "input": "Describe a person.",
        "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        "max_output_tokens": 96,
    }
    if stream:
        _, response = _streamed(edge, **request)
    else:
        response = edge.client().responses.create(**GREEDY, **request)
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert response.status == "completed"
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_step_function_call_loop(edge: EdgeProcess, stream: bool) -> None:
    """tool_choice required gives a call; its output, sent back with previous_response_id,
    gets a text answer. The stored conversation is the one a client would resend."""
    client = edge.client()
    question: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    step1: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 64}
    if stream:
        events, first = _streamed(edge, input=question, **step1)
        assert _collapse([e.type for e in events][2:-1]) == CALL_EVENTS
        [delta] = [e for e in events if e.type == "response.function_call_arguments.delta"]
        assert delta.delta == _calls(first)[0].arguments
    else:
        first = client.responses.create(input=question, **step1, **GREEDY)
    assert first.status == "completed" and first.tool_choice == "required"
    [call] = _calls(first)
    assert call.name == "get_weather" and call.id and call.id.startswith("fc_")
    assert isinstance(json.loads(call.arguments)["city"], str)
    result: Any = {
        "type": "function_call_output",
        "call_id": call.call_id,
        "output": '{"sky": "sunny"}',
    }
    step2: dict[str, Any] = {"tools": [WEATHER], "max_output_tokens": 48}
    if stream:
        _, second = _streamed(edge, input=[result], previous_response_id=first.id, **step2)
    else:
        second = client.responses.create(
            input=[result], previous_response_id=first.id, **step2, **GREEDY
        )
    assert second.previous_response_id == first.id
    assert not _calls(second) and second.output_text.strip()
    history = [*question, *(item.model_dump() for item in first.output), result]
    resent = client.responses.create(input=history, **{**step2, "max_output_tokens": 1}, **GREEDY)
    assert second.usage is not None and resent.usage is not None
    assert second.usage.input_tokens == resent.usage.input_tokens


def _text_part(response: Response) -> ResponseOutputText:
    """The output text of a response's message."""
    [message] = [item for item in response.output if isinstance(item, ResponseOutputMessage)]
    [part] = message.content
    assert isinstance(part, ResponseOutputText)
    return part


def _check_logprobs(entries: list[Any], text: str, top: int) -> None:
    """Entries spell the text; greedy: each chosen token is its position's top-1."""
    assert entries and b"".join(bytes(e.bytes) for e in entries).decode() == text
    for entry in entries:
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == top and entry.logprob <= 0
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(values[0], abs=1e-6)


LOGPROBS: dict[str, Any] = {
    "input": "Write one sentence about the sea.",
    "include": ["message.output_text.logprobs"],
    "top_logprobs": 3,
    "max_output_tokens": 16,
}


def test_included_logprobs_spell_the_output_text(edge: EdgeProcess) -> None:
    response = edge.client().responses.create(**LOGPROBS, **GREEDY)
    assert response.top_logprobs == 3
    part = _text_part(response)
    assert part.logprobs is not None
    _check_logprobs(part.logprobs, part.text, 3)
    assert response.usage is not None and len(part.logprobs) == response.usage.output_tokens
    stored = edge.client().responses.retrieve(response.id)
    assert _text_part(stored).logprobs == part.logprobs


def test_streamed_logprobs_come_with_their_text_deltas(edge: EdgeProcess) -> None:
    events, final = _streamed(edge, **LOGPROBS)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    streamed = [entry for e in deltas for entry in e.logprobs]
    part = _text_part(final)
    assert part.logprobs is not None
    _check_logprobs(part.logprobs, part.text, 3)
    # The events' entries are the part's, without bytes, as OpenAI sends them.
    expected = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                for e in part.logprobs]  # fmt: skip
    assert [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs or []])
            for e in streamed] == expected  # fmt: skip
    for delta in deltas:  # each delta's entries spell (the start of) its own text
        assert delta.delta.encode().startswith(b"".join(e.token.encode() for e in delta.logprobs))
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [e.token for e in done.logprobs] == [e.token for e in part.logprobs]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_with_tools_spell_the_text_and_leave_calls_out(
    edge: EdgeProcess, stream: bool
) -> None:
    """With tools the text passes the tool-call parser (which holds back what may start a
    call); a required call is no text, so its tokens' logprobs go nowhere."""

    def create(**kwargs: Any) -> Response:
        ask = {**LOGPROBS, "tools": [WEATHER], "max_output_tokens": 64, **kwargs}
        if stream:
            return _streamed(edge, **ask)[1]
        return edge.client().responses.create(**ask, **GREEDY)

    text = create(input="Hi! Tell me about Paris, then check its weather.")
    assert not _calls(text)
    part = _text_part(text)
    assert part.logprobs is not None
    _check_logprobs(part.logprobs, part.text, 3)
    called = create(input="What is the weather in Paris?", tool_choice="required")
    [call] = _calls(called)
    assert [item.type for item in called.output] == ["function_call"]
    assert isinstance(json.loads(call.arguments)["city"], str)


def test_logprobs_are_left_out_unless_included(edge: EdgeProcess) -> None:
    """top_logprobs alone asks for nothing, as in vLLM's Responses API."""
    plain = {**LOGPROBS, "include": []}
    response = edge.client().responses.create(**plain, **GREEDY)
    assert response.output_text and _text_part(response).logprobs == []
    events, _ = _streamed(edge, **plain)
    assert all(not e.logprobs for e in events if e.type == "response.output_text.delta")


def test_leaving_a_streamed_response_cancels_its_generation(edge: EdgeProcess) -> None:
    before = edge.metrics()
    body = {"model": DEFAULT_PAIR, "input": "Tell me a long story about a dragon.",
            "max_output_tokens": 1500, "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{edge.base_url}/v1/responses", json=body, headers=EDGE) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                break  # leave after the first text
    cancelled = before["tandem_edge_cancelled_generations_total"] + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slot is freed just after the cancel is counted
        after = edge.metrics()
        done = after["tandem_edge_cancelled_generations_total"] == cancelled
        if done and after["tandem_edge_running_requests"] == 0:
            break
        time.sleep(0.05)
    assert after["tandem_edge_cancelled_generations_total"] == cancelled
    assert after["tandem_edge_running_requests"] == 0
    generated = (
        after["tandem_edge_engine_generated_tokens_total"]
        - before["tandem_edge_engine_generated_tokens_total"]
    )
    assert generated < 200  # stopped near the disconnect, not after 1500 tokens


def test_an_unknown_previous_response_id_is_a_404_naming_it(edge: EdgeProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        edge.client().responses.create(input="Hi", previous_response_id="resp_nope", **GREEDY)
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "previous_response_id"
    assert "resp_nope" in body["message"]


def test_unstored_and_deleted_responses_are_gone(edge: EdgeProcess) -> None:
    client = edge.client()
    unstored = client.responses.create(input="Hi", store=False, max_output_tokens=4, **GREEDY)
    kept = client.responses.create(input="Hi", max_output_tokens=4, **GREEDY)
    client.responses.delete(kept.id)
    for gone in (unstored.id, kept.id):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.retrieve(gone)
        assert gone in str(caught.value)
    reply = httpx.delete(f"{edge.base_url}/v1/responses/{kept.id}", timeout=10)
    assert reply.status_code == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
            "tool_choice",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "p"}}}, "text.format"),
        (
            {"text": {"format": {"type": "json_schema", "name": "p", "schema": {"not": {}}}}},
            "text.format.schema",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{**WEATHER, "name": "get weather"}]}, "tools.0.name"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"include": ["message.output_text.logprob"]}, "include.0"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    edge: EdgeProcess, body: dict[str, Any], named: str
) -> None:
    request = {"model": DEFAULT_PAIR, "input": "Hi", **body}
    reply = httpx.post(f"{edge.base_url}/v1/responses", json=request, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"]
