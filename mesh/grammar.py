"""Constrained decoding shared by both roles: which schemas, and the tool-call wrapper.

Edge (llama.cpp GBNF) and cloud (vLLM's xgrammar EBNF) each turn a JSON schema
into a grammar of their own dialect; this module holds what must be the same on
both sides, so a constrained answer has one shape whatever the route:

- the JSON Schema keywords a constraint may use (both converters implement
  them; anything else is refused up front with the keyword named, never
  silently dropped);
- the schema of one enforced tool call, ``{"name": <one of the tools>,
  "arguments": <that tool's parameters>}``, in the key order of the chat
  template's Hermes format;
- ``tool_call_grammar``, which wraps a JSON grammar (either dialect: both name
  the start rule ``root`` and quote literals alike) into 1 to N blocks
  ``<tool_call>\\n{...}\\n</tool_call>``, the format the template shows the model
  and the tool-call parsers read;
- ``TOOL_CALL_TRIGGER``: under ``tool_choice: auto`` with ``strict`` tools the
  answer is free until the model writes it, and constrained to valid calls from
  there on (a lazy grammar on the edge, a structural tag in vLLM).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

MAX_TOOL_CALLS = 4  # parallel calls one enforced answer may hold
TOOL_CALL_TRIGGER = "<tool_call>"  # where a lazy tool-call constraint starts

# Keywords both llama.cpp's json_schema_to_gbnf and xgrammar enforce (or that only
# annotate). A schema using any other keyword is refused with its name.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems",
        "minItems", "maxItems", "enum", "const", "oneOf", "anyOf", "allOf", "$ref", "$defs",
        "definitions", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "title", "description", "default",
        "examples", "$schema", "$id", "$comment", "strict", "nullable",
    }
)  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("oneOf", "anyOf", "allOf", "prefixItems")
_ROOT_RULE = re.compile(r"^root\s*::=", re.MULTILINE)


def unsupported_keyword(schema: Any, path: str = "") -> str | None:
    """The first keyword (with its path) that constrained decoding cannot enforce."""
    for where, node in _subschemas(schema, path):
        for key in node:
            if key not in SUPPORTED_KEYWORDS:
                return f"{where}{key}"
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return f"{where}$ref (only local references '#/...' are supported)"
    return None


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` cannot constrain decoding (a keyword neither converter enforces,
    or not a valid JSON Schema at all), or None when it can."""
    keyword = unsupported_keyword(schema)
    if keyword is not None:
        return f"the schema keyword {keyword!r} is not supported by constrained decoding"
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = ".".join(str(p) for p in exc.path)
        return f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}"
    return None


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            yield from _subschemas(sub, f"{path}{key}.{name}.")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            yield from _subschemas(sub, f"{path}{key}.{i}.")
    for key in ("items", "additionalProperties"):
        yield from _subschemas(schema.get(key), f"{path}{key}.")


def tool_call_schema(tools: list[dict[str, Any]], *, strict_only: bool = False) -> dict[str, Any]:
    """The schema of one call of one of ``tools`` (OpenAI tool definitions).

    ``strict_only``: only tools marked ``strict`` have their arguments checked against
    their parameters; the others' arguments may be any JSON object (``auto``, as vLLM)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": (
                    tool["function"].get("parameters") or {"type": "object"}
                    if tool["function"].get("strict") or not strict_only
                    else {"type": "object"}
                ),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"oneOf": calls}


def tool_call_grammar(json_grammar: str, calls: int) -> str:
    """1 to ``calls`` Hermes tool-call blocks around a JSON grammar whose start rule is root."""
    if not _ROOT_RULE.search(json_grammar):
        raise ValueError("the JSON grammar has no root rule")
    body = _ROOT_RULE.sub("tandemcall ::=", json_grammar)
    more = ""
    for _ in range(calls - 1):  # nested optionals: every grammar dialect has them
        more = f'("\\n" tandemblock {more})?'
    return (
        f"root ::= tandemblock {more}\n"
        'tandemblock ::= "<tool_call>\\n" tandemcall "\\n</tool_call>"\n'
        f"{body}"
    )
