"""``/openapi.json`` describes the bodies the edge really takes and gives.

Checked against the running daemon: real requests validate against the documented
request schemas, real answers (whole and streamed) against the documented answers,
and a body the edge refuses is refused by the schema too.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import httpx
import jsonschema
import pytest

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

EDGE = {"x-tandem-route": "edge"}
CHAT = {
    "model": DEFAULT_PAIR,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 4,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
}


@cache
def _document(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/openapi.json", timeout=30)
    response.raise_for_status()
    return dict(response.json())


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    """A validator of ``schema`` resolving ``#/components/...`` refs in ``doc``."""
    root = {**schema, "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


def _body_schema(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]
    return dict(body["schema"])


def _answer_schema(doc: dict[str, Any], path: str, method: str, media: str) -> dict[str, Any]:
    content = doc["paths"][path][method]["responses"]["200"]["content"][media]
    return dict(content["schema"] if media == "application/json" else content["x-event-data"])


def test_every_api_operation_names_its_bodies(edge: EdgeProcess) -> None:
    doc = _document(edge.base_url)
    schemas = doc["components"]["schemas"]
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/responses", "post"),
    ]:
        ref = _body_schema(doc, path, method)["$ref"].rsplit("/", 1)[-1]
        assert "properties" in schemas[ref], f"{path}: {ref} has no fields"
        assert {"400", "401", "429"} <= set(doc["paths"][path][method]["responses"])
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("messages", "tools", "tool_choice", "response_format", "logprobs", "n"):
        assert field in chat


def test_real_requests_and_answers_follow_the_document(edge: EdgeProcess) -> None:
    doc = _document(edge.base_url)
    _validator(doc, _body_schema(doc, "/v1/chat/completions", "post")).validate(CHAT)
    answer = httpx.post(f"{edge.base_url}/v1/chat/completions", json=CHAT, headers=EDGE, timeout=60)
    assert answer.status_code == 200
    whole = _answer_schema(doc, "/v1/chat/completions", "post", "application/json")
    _validator(doc, whole).validate(answer.json())
    chunk = _validator(
        doc, _answer_schema(doc, "/v1/chat/completions", "post", "text/event-stream")
    )
    with httpx.stream(
        "POST", f"{edge.base_url}/v1/chat/completions", json={**CHAT, "stream": True},
        headers=EDGE, timeout=60,
    ) as stream:  # fmt: skip
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    for event in events[:-1]:
        chunk.validate(json.loads(event))
    responses = {"model": DEFAULT_PAIR, "input": "Hi", "max_output_tokens": 4}
    _validator(doc, _body_schema(doc, "/v1/responses", "post")).validate(responses)
    answer = httpx.post(f"{edge.base_url}/v1/responses", json=responses, headers=EDGE, timeout=60)
    assert answer.status_code == 200
    _validator(doc, _answer_schema(doc, "/v1/responses", "post", "application/json")).validate(
        answer.json()
    )


@pytest.mark.parametrize(
    "bad",
    [{"messages": []}, {"n": 0}, {"top_logprobs": 21}, {"temperature": 3}],
    ids=["no-messages", "n-zero", "top-logprobs-21", "temperature-3"],
)
def test_a_body_the_edge_refuses_the_document_refuses(
    edge: EdgeProcess, bad: dict[str, Any]
) -> None:
    doc = _document(edge.base_url)
    body = {**CHAT, **bad}
    answer = httpx.post(f"{edge.base_url}/v1/chat/completions", json=body, headers=EDGE, timeout=60)
    assert answer.status_code == 400
    _validator(doc, _answer_schema(doc, "/v1/chat/completions", "post", "application/json"))
    errors = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]
    _validator(doc, errors["application/json"]["schema"]).validate(answer.json())
    request = _validator(doc, _body_schema(doc, "/v1/chat/completions", "post"))
    assert not request.is_valid(body)
