"""Chat templates: load them from package data and render conversations.

The edge renders prompts with `render_chat` and tokenizes the text with
llama.cpp; the cloud hands the same template string to vLLM, which renders
it with transformers' `apply_chat_template`. Both must give the same text
(and so the same token ids), so the Jinja environment here mirrors
transformers': a sandbox with trim_blocks/lstrip_blocks, its `tojson` filter
(no HTML escaping, non-ASCII kept) and `raise_exception`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import TemplateNotFoundError, TemplateRenderError, one_line

log = logging.getLogger(__name__)

TEMPLATE_SUFFIX = ".jinja"


def template_names() -> list[str]:
    """Return the names of the chat templates shipped in models/templates."""
    folder = resources.files("models") / "templates"
    return sorted(
        entry.name.removesuffix(TEMPLATE_SUFFIX)
        for entry in folder.iterdir()
        if entry.name.endswith(TEMPLATE_SUFFIX)
    )


def load_template(name: str) -> str:
    """Return the text of the chat template `name` (with or without `.jinja`)."""
    stem = name.removesuffix(TEMPLATE_SUFFIX)
    entry = resources.files("models") / "templates" / f"{stem}{TEMPLATE_SUFFIX}"
    if not entry.is_file():
        raise TemplateNotFoundError(
            f"no chat template named {name!r}; available: {', '.join(template_names())}"
        )
    return entry.read_text(encoding="utf-8")


def render_chat(
    template: str,
    messages: Iterable[Mapping[str, Any] | Any],
    tools: Iterable[Mapping[str, Any] | Any] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render a conversation (OpenAI-style messages) with a chat template string."""
    chat = [_normalize_message(message) for message in messages]
    tool_list = [_as_dict(tool) for tool in tools] if tools is not None else None
    try:
        return _compile(template).render(
            messages=chat, tools=tool_list, add_generation_prompt=add_generation_prompt, **extra
        )
    except jinja2.TemplateError as exc:
        raise TemplateRenderError(f"cannot render the conversation: {one_line(exc)}") from exc


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same as transformers' override: Jinja's own tojson escapes HTML
    # characters (<, >, &, '), which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateRenderError(
            f"chat template syntax error, line {exc.lineno}: {one_line(exc)}"
        ) from exc


def _as_dict(item: Mapping[str, Any] | Any) -> dict[str, Any]:
    if hasattr(item, "model_dump"):  # pydantic wire models from the edge
        return item.model_dump(exclude_none=True)
    return dict(item)


def _normalize_message(message: Mapping[str, Any] | Any) -> dict[str, Any]:
    # Put messages in the form vLLM (0.32, renderers/chat_utils.py) gives the
    # template, so that the edge and the cloud render the same text: text parts
    # joined by newlines, empty tool_calls dropped, and tool-call arguments (a
    # JSON string in the OpenAI API) parsed to objects.
    out = _as_dict(message)
    if isinstance(out.get("content"), list):
        out["content"] = "\n".join(_text_parts(out["content"]))
    if "tool_calls" in out and not out["tool_calls"]:
        del out["tool_calls"]
    if out.get("tool_calls"):
        out["tool_calls"] = [_normalize_tool_call(call) for call in out["tool_calls"]]
    return out


def _text_parts(parts: list[Any]) -> list[str]:
    texts = []
    for part in parts:
        part = _as_dict(part) if not isinstance(part, str) else {"type": "text", "text": part}
        if part.get("type") != "text":
            raise TemplateRenderError(f"unsupported content part type {part.get('type')!r}")
        texts.append(part.get("text", ""))
    return texts


def _normalize_tool_call(call: Mapping[str, Any] | Any) -> dict[str, Any]:
    call = _as_dict(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        call["function"] = {**function, "arguments": _parse_arguments(function.get("arguments"))}
    return call


def _parse_arguments(arguments: Any) -> Any:
    # vLLM's rules: missing, malformed or non-object arguments become {} so a
    # bad call in the history does not make every later turn fail.
    if not arguments:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            log.warning("tool-call arguments are not valid JSON; rendering them as {}")
            return {}
    if not isinstance(arguments, dict):
        log.warning("tool-call arguments are not a JSON object; rendering them as {}")
        return {}
    return arguments
