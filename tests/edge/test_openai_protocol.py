"""The chat request's tools as the template sees them: dumped once, handed out fresh."""

from __future__ import annotations

from typing import Any

from edge.openai_protocol import ChatCompletionRequest


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_active_tools_follow_tool_choice() -> None:
    tools = [_tool("f"), _tool("g")]
    named = _chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})

    assert [t["function"]["name"] for t in _chat(tools=tools).active_tools() or []] == ["f", "g"]
    assert [t["function"]["name"] for t in named.active_tools() or []] == ["g"]
    assert _chat(tools=tools, tool_choice="none").active_tools() is None
    assert _chat().active_tools() is None


def test_each_caller_gets_its_own_list_of_the_same_dump() -> None:
    body = _chat(tools=[_tool("f"), _tool("g")])
    first = body.active_tools()
    assert first is not None
    first.pop()  # a caller trimming its list does not trim the next caller's
    again = body.active_tools()

    assert [t["function"]["name"] for t in again or []] == ["f", "g"]
    assert again == [_tool("f"), _tool("g")]
    # The n > 1 choices are copies with another seed: the same tools.
    assert body.model_copy(update={"seed": 3}).active_tools() == again
