"""Parsing Hermes-style tool calls (``<tool_call>{json}</tool_call>``) out of model text.

The catalog's tool-aware chat template asks the model to answer calls in this
form (the cloud uses vLLM's ``hermes`` parser for the same format). Small models
often get it wrong, so a block that is not valid JSON, lacks a name, or names an
unknown tool is reported as malformed and its text is kept as content: the
client sees what the model said, and the daemon never crashes on it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    """One well-formed call, ready for the OpenAI ``tool_calls`` list."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ToolCallParse:
    """Result of parsing a whole answer."""

    content: str | None
    calls: list[ParsedToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # one reason per bad block


def _parse_block(raw: str, known: set[str]) -> ParsedToolCall | str:
    """A call, or the reason the block is malformed."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return "missing a string 'name'"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return "'arguments' is a string that is not JSON"
    if not isinstance(args, dict):
        return "'arguments' is not a JSON object"
    if known and obj["name"] not in known:
        return f"unknown tool {obj['name']!r}"
    return ParsedToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=obj["name"],
        arguments=json.dumps(args, ensure_ascii=False),
    )


def parse_tool_calls(text: str, tool_names: set[str]) -> ToolCallParse:
    """Split an answer into content and tool calls; malformed blocks stay in content."""
    calls: list[ParsedToolCall] = []
    malformed: list[str] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        kept.append(text[last : match.start()])
        last = match.end()
        result = _parse_block(match.group(1).strip(), tool_names)
        if isinstance(result, ParsedToolCall):
            calls.append(result)
        else:
            malformed.append(result)
            kept.append(match.group(0))
    kept.append(text[last:])
    content = "".join(kept).strip()
    if malformed:
        logger.info("model emitted %d malformed tool call(s): %s", len(malformed), malformed)
    return ToolCallParse(content=content or None, calls=calls, malformed=malformed)


class ToolCallStream:
    """Streams content until a tool call may start, then holds the rest for parsing."""

    def __init__(self, tool_names: set[str]) -> None:
        self._names = tool_names
        self._held = ""
        self._in_call = False

    def push(self, text: str) -> str:
        """Add generated text; return the content that is safe to stream now."""
        if self._in_call:
            self._held += text
            return ""
        buf = self._held + text
        start = buf.find(OPEN_TAG)
        if start >= 0:
            self._in_call = True
            self._held = buf[start:]
            return buf[:start]
        keep = _partial_tag_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def finish(self) -> ToolCallParse:
        """Parse what was held; its ``content`` is the text not yet streamed."""
        if not self._in_call:
            return ToolCallParse(content=self._held or None)
        parsed = parse_tool_calls(self._held, self._names)
        return parsed


def _partial_tag_len(buf: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of the open tag."""
    for n in range(min(len(OPEN_TAG) - 1, len(buf)), 0, -1):
        if buf.endswith(OPEN_TAG[:n]):
            return n
    return 0
