"""Output constraints as llama.cpp grammars (GBNF), compiled once per distinct constraint.

``mesh.grammar`` fixes what a constraint means on every route; here it becomes
llama.cpp's dialect: a JSON schema through llama-cpp-python's own converter
(``json_schema_to_gbnf``), any JSON object through its ``JSON_GBNF``, and tool
calls wrapped by ``mesh.grammar.tool_call_grammar``. Greedy or sampled, the
grammar masks every token that would leave the language, and an end token is
allowed only once the answer is complete.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from edge.errors import InvalidRequestError
from mesh.grammar import tool_call_grammar
from mesh.protocol import OutputConstraint

_CACHED_GRAMMARS = 256


def llama_grammar(constraint: OutputConstraint) -> Any:
    """The ``LlamaGrammar`` enforcing ``constraint`` (parsed once, then cached)."""
    return _compiled(constraint.model_dump_json())


def gbnf(constraint: OutputConstraint) -> str:
    """The GBNF text of ``constraint``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = constraint.json_schema
    if schema is None:
        text = JSON_GBNF
    else:
        try:
            text = json_schema_to_gbnf(json.dumps(schema))
        except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
            raise InvalidRequestError(
                f"the JSON schema cannot be enforced: {exc}", param="response_format"
            ) from exc
    return tool_call_grammar(text, constraint.tool_calls) if constraint.tool_calls else text


@lru_cache(maxsize=_CACHED_GRAMMARS)
def _compiled(key: str) -> Any:
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(gbnf(OutputConstraint.model_validate_json(key)), verbose=False)
