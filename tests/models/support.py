"""Shared data of the models tests: sample conversations and the prepared-weights record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prepared:
    """Cloud weights converted once per test session."""

    home: Path
    path: Path
    seconds: float


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "now"}}


def weather_call(city: str, call_id: str = "call_1") -> dict[str, Any]:
    """Return an OpenAI tool call to get_weather with dict arguments."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": city, "unit": "c"}},
    }


# (id, messages, tools, add_generation_prompt), in the form vLLM gives a template:
# tool-call arguments already parsed to objects.
CONVERSATIONS: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = [
    ("single-user", [{"role": "user", "content": "What is the capital of France?"}], None, True),
    (
        "system-multi-turn",
        [
            {"role": "system", "content": "You are terse. Ünïcödé 数字 🙂"},
            {"role": "user", "content": "Hi!\n  How are you?"},
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "def f(x):\n\treturn x ** 2"},
        ],
        None,
        False,
    ),
    (
        "tools-first-turn",
        [{"role": "user", "content": "Weather in Zürich?"}],
        [WEATHER_TOOL, TIME_TOOL],
        True,
    ),
    (
        "tool-call-and-responses",
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [weather_call("Paris"), weather_call("Oslo", "call_2")],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 4}'},
            {"role": "assistant", "content": "Paris 21 °C, Oslo 4 °C."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER_TOOL],
        True,
    ),
    (
        "tool-call-no-content",
        [
            {"role": "user", "content": "Weather in Lyon?"},
            {"role": "assistant", "content": None, "tool_calls": [weather_call("Lyon")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        [WEATHER_TOOL],
        True,
    ),
]
