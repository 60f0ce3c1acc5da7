"""Structured outputs and enforced tool choice on the edge route, through the openai client.

The default 135M model answers prose to these prompts when decoding is free; under
the grammar every answer must parse and follow its schema, streamed or not.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

EDGE = {"x-tandem-route": "edge"}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}


def _chat(edge: EdgeProcess, stream: bool, **kwargs: Any) -> tuple[str, list[Any], str]:
    """(content, tool calls, finish_reason) of one greedy answer."""
    client = edge.client()
    kwargs = {"model": DEFAULT_PAIR, "temperature": 0, "max_tokens": 96, **kwargs}
    if not stream:
        answer = client.chat.completions.create(extra_headers=EDGE, **kwargs)
        choice = answer.choices[0]
        return choice.message.content or "", choice.message.tool_calls or [], choice.finish_reason
    parts: list[str] = []
    calls: list[Any] = []
    finish = ""
    for chunk in client.chat.completions.create(extra_headers=EDGE, stream=True, **kwargs):
        if chunk.choices:
            delta = chunk.choices[0].delta
            parts.append(delta.content or "")
            calls.extend(delta.tool_calls or [])
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_parse_and_follow_the_schema(edge: EdgeProcess, stream: bool) -> None:
    content, _, finish = _chat(
        edge,
        stream,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    person = json.loads(content)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert finish == "stop"


def _completes_to_json(prefix: str) -> bool:
    """Whether some completion of ``prefix`` is one JSON value: an open string closed, a
    dangling key, colon or literal given its end, a dangling comma dropped, the open
    brackets closed. What a constrained answer cut by ``max_tokens`` must be."""
    closers, in_string, escaped = [], False, False
    for ch in prefix:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]" and (not closers or closers.pop() != ch):
            return False
    text = prefix + (('n"' if escaped else '"') if in_string else "")
    text = text.rstrip().removesuffix(",")
    ends = ("", "null", ":null", "0", "e", "ue", "rue", "se", "lse", "l", "ll", "ull")
    for end in ends:
        try:
            json.loads(text + end + "".join(reversed(closers)))
        except json.JSONDecodeError:
            continue
        return True
    return False


def test_the_json_prefix_check_tells_cut_json_from_broken() -> None:
    for cut in ('{"a": "bl', '{"a": [1, 2', '{"a"', '{"a":', '{"a": tr', '{"a": 1,', "{"):
        assert _completes_to_json(cut), cut
    for broken in ('{"a": 1}}', '{"a" 1', "[}", 'x{"a": 1'):
        assert not _completes_to_json(broken), broken


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_answers_are_one_json_object(edge: EdgeProcess, stream: bool) -> None:
    content, _, finish = _chat(
        edge,
        stream,
        messages=[{"role": "user", "content": "List three colours."}],
        response_format={"type": "json_object"},
        max_tokens=200,
    )
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # the small model may list on past max_tokens (it did at a near-tie): a cut object
        assert finish == "length" and content.lstrip().startswith("{")
        assert _completes_to_json(content), content


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_yields_a_valid_call(edge: EdgeProcess, stream: bool) -> None:
    content, calls, finish = _chat(
        edge,
        stream,
        messages=[{"role": "user", "content": "What time is it in Berlin?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
    )
    assert finish == "tool_calls" and len(calls) == 1 and not content
    call = calls[0].function
    arguments = json.loads(call.arguments)
    if call.name == "get_weather":
        assert isinstance(arguments["city"], str)
    else:
        assert call.name == "get_time" and arguments["zone"] in ("UTC", "CET")


def test_named_tool_choice_calls_that_tool(edge: EdgeProcess) -> None:
    _, calls, finish = _chat(
        edge,
        False,
        messages=[{"role": "user", "content": "Hello there!"}],  # nothing asks for a tool
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)


# Makes the default model open a Hermes call under tool_choice auto; left free it then
# writes the tool's definition instead of arguments (a malformed call every time).
CALL_IN_AUTO = (
    "Reply with exactly one line of the form <tool_call>{...}</tool_call> and nothing else."
)
UNIT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("city", ["Paris", "Tokyo", "Cairo"])
def test_strict_tools_under_auto_get_valid_arguments(
    edge: EdgeProcess, stream: bool, city: str
) -> None:
    """A lazy grammar: free until the model writes <tool_call>, a valid call from there."""
    messages = [
        {"role": "system", "content": CALL_IN_AUTO},
        {"role": "user", "content": f"<tool_call> get_weather for {city}"},
    ]
    _, calls, finish = _chat(edge, stream, messages=messages, tools=[UNIT_WEATHER], max_tokens=60)
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    arguments = json.loads(calls[0].function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")


def test_strict_tools_under_auto_leave_prose_free(edge: EdgeProcess) -> None:
    """No <tool_call>, no constraint: the answer is the model's free text."""
    messages = [{"role": "user", "content": "Tell me about the weather in Paris."}]
    content, calls, finish = _chat(
        edge, False, messages=messages, tools=[UNIT_WEATHER], max_tokens=24
    )
    # A grammar applied from the start would have forced "<tool_call>" first.
    assert content.strip() and not calls and finish in ("stop", "length")
    assert "<tool_call>" not in content


def test_free_decoding_is_unchanged_without_a_constraint(edge: EdgeProcess) -> None:
    """The same prompt without tool_choice: prose, and no call (the parser finds none)."""
    content, calls, finish = _chat(
        edge, False, messages=[{"role": "user", "content": "Hello there!"}], tools=[WEATHER]
    )
    assert content and not calls and finish in ("stop", "length")


SCHEMA_PARAM = "response_format.json_schema.schema"
PATTERN_PROPERTIES = {"type": "object", "patternProperties": {}}


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }


def _tool(parameters: dict[str, Any], **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters, **function}}


@pytest.mark.parametrize(
    ("body", "named", "param"),
    [
        (_schema({"type": "object", "not": {}}), "'not'", SCHEMA_PARAM),
        (_schema({"type": "nonsense"}), "not a valid JSON Schema", SCHEMA_PARAM),
        ({"response_format": {"type": "json_schema"}}, "json_schema", "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
        (
            {"tools": [_tool(PATTERN_PROPERTIES)], "tool_choice": "required"},
            "'patternProperties'",
            "tools.0.function.parameters",
        ),
        (  # a strict tool's parameters become a grammar under auto too
            {"tools": [_tool(PATTERN_PROPERTIES, strict=True)]},
            "'patternProperties'",
            "tools.0.function.parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "'nope'",
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "at least one tool", "tool_choice"),
    ],
    ids=["keyword", "invalid", "no-schema", "type", "tool-keyword", "strict-keyword",
         "unknown-tool", "no-tools"],
)  # fmt: skip
def test_unsupported_constraints_are_a_400_naming_the_problem(
    edge: EdgeProcess, body: dict[str, Any], named: str, param: str
) -> None:
    request = {"model": DEFAULT_PAIR, "messages": [{"role": "user", "content": "Hi"}], **body}
    reply = httpx.post(f"{edge.base_url}/v1/chat/completions", json=request, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"]
    assert error["param"] == param


def test_the_openai_client_sees_the_400(edge: EdgeProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        edge.client().chat.completions.create(
            model=DEFAULT_PAIR,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={  # type: ignore[typeddict-item]
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"if": {}}},
            },
        )
    assert "'if'" in str(caught.value)
