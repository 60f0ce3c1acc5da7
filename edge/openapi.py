"""The edge's OpenAPI document: every endpoint's real request and response bodies.

The handlers read their bodies themselves (``server.parse_body``: size limit first,
then JSON, then the pydantic model), so FastAPI cannot see the models; this module
puts them back into ``/openapi.json`` from the same pydantic models the handlers
validate with, which is what API fuzzers and client generators read. A streamed
answer is ``text/event-stream`` whose events' ``data`` is the chunk model named.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from edge.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
)
from edge.responses_protocol import ResponseDeleted, ResponseObject, ResponsesRequest, StreamEvent
from mesh.version import __version__


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: 4xx and 5xx, and an error event inside a stream."""

    error: ErrorDetail = Field(description="what went wrong, and the field it concerns")


# (path, method) -> (request body, answer, streamed event): None where there is none.
_BODIES: dict[
    tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel], type[BaseModel] | None]
] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, ChatCompletion, ChatCompletionChunk),
    ("/v1/completions", "post"): (CompletionRequest, Completion, Completion),
    ("/v1/responses", "post"): (ResponsesRequest, ResponseObject, StreamEvent),
    ("/v1/responses/{response_id}", "get"): (None, ResponseObject, None),
    ("/v1/responses/{response_id}", "delete"): (None, ResponseDeleted, None),
    ("/v1/models", "get"): (None, ModelList, None),
}

# OpenAPI links: what an answer's fields open next. A stored response is read, deleted
# and continued by its id (clients and stateful fuzzers follow these).
_RESPONSE_ID = "$response.body#/id"
_LINKS = {
    ("/v1/responses", "post"): {
        "GetResponse": (("/v1/responses/{response_id}", "get"), {"response_id": _RESPONSE_ID}),
        "DeleteResponse": (
            ("/v1/responses/{response_id}", "delete"),
            {"response_id": _RESPONSE_ID},
        ),
    },
}

_ERRORS = {
    "400": "invalid request: the message names the field",
    "401": "missing or invalid API key",
    "404": "unknown model or response id",
    "413": "request body too large",
    "429": "queue full: retry after the retry-after header's seconds",
    "503": "no cloud worker for a route that needs one",
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the bodies the handlers parse by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of the routes, with the request and answer models filled in."""
    schema = get_openapi(
        title="Tandem edge",
        version=__version__,
        description="The OpenAI API on an edge of the Tandem mesh.",
        routes=app.routes,
    )
    inputs = {m for m, _, _ in _BODIES.values() if m is not None}
    outputs = {m for _, m, _ in _BODIES.values()} | {m for *_, m in _BODIES.values() if m}
    outputs.add(ErrorBody)
    refs, defs = models_json_schema(
        [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    error = {"content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}}
    for (path, method), (request, answer, event) in _BODIES.items():
        operation = schema["paths"][path][method]
        if request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(request, "validation")]}},
            }
        content: dict[str, Any] = {"application/json": {"schema": refs[(answer, "serialization")]}}
        if event is not None:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "server-sent events"},
                "x-event-data": refs[(event, "serialization")],
            }
        operation["responses"] = {
            "200": {"description": "the answer (streamed when the request says stream)",
                    "content": content},
            **{status: {"description": text, **error} for status, text in _ERRORS.items()},
        }  # fmt: skip
    for (path, method), links in _LINKS.items():
        schema["paths"][path][method]["responses"]["200"]["links"] = {
            name: {
                "operationId": schema["paths"][target][verb]["operationId"],
                "parameters": parameters,
            }
            for name, ((target, verb), parameters) in links.items()
        }
    return schema
