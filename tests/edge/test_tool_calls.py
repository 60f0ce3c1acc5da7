"""Hermes-style tool-call parsing, including what small models get wrong."""

import json

from edge.tool_calls import ToolCallStream, parse_tool_calls

NAMES = {"get_weather", "add"}


def test_single_call_is_parsed_and_content_is_none() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content is None
    assert [c.name for c in parsed.calls] == ["get_weather"]
    assert json.loads(parsed.calls[0].arguments) == {"city": "Paris"}
    assert parsed.malformed == []


def test_text_around_calls_is_content_and_ids_are_unique() -> None:
    text = (
        'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>'
    )
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content == "Sure."
    assert len(parsed.calls) == 2
    assert parsed.calls[0].id != parsed.calls[1].id
    assert json.loads(parsed.calls[1].arguments) == {"a": 3}


def test_malformed_blocks_are_reported_and_kept_as_content() -> None:
    cases = {
        "<tool_call>{not json}</tool_call>": "not valid JSON",
        '<tool_call>{"arguments": {}}</tool_call>': "missing a string 'name'",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>': "unknown tool",
        '<tool_call>{"name": "add", "arguments": [1]}</tool_call>': "not a JSON object",
    }
    for text, reason in cases.items():
        parsed = parse_tool_calls(text, NAMES)
        assert parsed.calls == []
        assert reason in parsed.malformed[0]
        assert parsed.content == text


def test_unterminated_call_at_end_of_answer_still_parses() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}', NAMES)
    assert [c.name for c in parsed.calls] == ["add"]


def test_stream_holds_back_from_the_open_tag() -> None:
    stream = ToolCallStream(NAMES)
    pieces = ["Let me ", "check <tool", '_call>{"name": "add", ', '"arguments": {}}</tool_call>']
    emitted = "".join(stream.push(p) for p in pieces)
    parsed = stream.finish()
    assert emitted == "Let me check "
    assert [c.name for c in parsed.calls] == ["add"]
    assert parsed.content is None


def test_stream_releases_a_false_alarm_prefix() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.push("a <to") == "a "
    assert stream.push("y") == "<toy"
    assert stream.finish().content is None
