"""Wire messages: round trips, strictness, versioning, typed errors and usage."""

from __future__ import annotations

import json

import pytest
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from mesh.errors import ProtocolError
from mesh.protocol import (
    CancelRequest,
    ErrorCode,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    NodeHeartbeat,
    NodeLoad,
    PolicyApplied,
    SamplingParams,
    StreamUsage,
    TokenChunk,
)

LOAD = NodeLoad(running=2, waiting=1, kv_cache_usage=0.25, tokens_per_s=88.5)
BEAT = NodeHeartbeat(
    node_id="cloud-1",
    role="cloud",
    model="HuggingFaceTB/SmolLM2-135M",
    version="0.1.0",
    load=LOAD,
    endpoint="tandem.v1.worker.cloud-1.generate",
    sent_at=1700000000.5,
)
REQUEST = GenerateRequest(
    request_id="req-1",
    session_id="sess-1",
    model="HuggingFaceTB/SmolLM2-135M",
    messages=[{"role": "user", "content": "hi"}],
    tools=[{"type": "function", "function": {"name": "ls", "parameters": {}}}],
    tool_choice="auto",
    sampling=SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=7, stop=["\n"]),
    resume_token_ids=[1, 2, 3],
    reply_subject="_INBOX.abc",
    deadline=1700000010.0,
)
USAGE = StreamUsage(prompt_tokens=12, completion_tokens=4, cached_tokens=8, worker_id="cloud-1")


@pytest.mark.parametrize(
    "message",
    [
        LOAD,
        BEAT,
        REQUEST,
        TokenChunk(
            request_id="r",
            seq=3,
            token_ids=[5],
            text="x",
            finish_reason="stop",
            usage=USAGE,
            is_end=True,
            error=ErrorInfo(code=ErrorCode.UNAVAILABLE, message="busy"),
        ),
        CancelRequest(request_id="req-1"),
        GenerateAccepted(request_id="req-1", worker_id="cloud-1"),
        PolicyApplied(node_id="edge-1", revision=3, applied=False, error="rules.0.route: ..."),
    ],
)
def test_round_trip_through_bytes(message: NodeLoad) -> None:
    data = message.to_bytes()
    assert type(message).from_bytes(data) == message
    # The wire JSON, byte for byte (a streamed GenerateRequest leaves out ``streaming``,
    # and one without the edge's prompt ids leaves out ``prompt``).
    leave_out = {"streaming", "prompt"} if isinstance(message, GenerateRequest) else None
    assert data == message.model_dump_json(exclude=leave_out).encode()
    assert json.loads(data)["schema_version"] == 1


def test_extra_field_is_rejected() -> None:
    payload = json.loads(BEAT.to_bytes())
    payload["surprise"] = True
    with pytest.raises(ProtocolError) as info:
        NodeHeartbeat.from_bytes(json.dumps(payload))
    assert "surprise" in str(info.value)


def test_nested_extra_field_is_rejected() -> None:
    payload = json.loads(BEAT.to_bytes())
    payload["load"]["gpu"] = "h100"
    with pytest.raises(ProtocolError) as info:
        NodeHeartbeat.from_bytes(json.dumps(payload))
    assert "load.gpu" in str(info.value)


def test_unknown_schema_version_is_rejected() -> None:
    payload = json.loads(CancelRequest(request_id="r").to_bytes())
    payload["schema_version"] = 2
    with pytest.raises(ProtocolError) as info:
        CancelRequest.from_bytes(json.dumps(payload).encode())
    assert "schema_version" in str(info.value)


def test_bad_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        TokenChunk.from_bytes(b"{not json")
    assert "TokenChunk" in str(info.value)


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        TokenChunk.from_bytes(CancelRequest(request_id="r").to_bytes())
    assert "kind" in str(info.value)


def test_out_of_range_load_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        NodeLoad(running=0, waiting=0, kv_cache_usage=1.5, tokens_per_s=0.0)
    assert info.value.errors()[0]["loc"] == ("kv_cache_usage",)


def test_messages_are_frozen() -> None:
    with pytest.raises(ValidationError):
        CancelRequest(request_id="r").request_id = "other"
    assert CancelRequest(request_id="r").request_id == "r"


def test_defaults_of_a_minimal_request() -> None:
    request = GenerateRequest(
        request_id="r", model="m", messages=[], reply_subject="_INBOX.x", session_id=None
    )
    assert request.resume_token_ids == []
    assert request.sampling == SamplingParams()
    assert request.deadline is None


def test_stream_usage_parses_from_the_end_chunk() -> None:
    end = TokenChunk(request_id="r", seq=0, is_end=True, finish_reason="stop", usage=USAGE)
    usage = TokenChunk.from_bytes(end.to_bytes()).usage
    assert usage is not None and (usage.prompt_tokens, usage.cached_tokens) == (12, 8)
    assert (usage.simulated, usage.engine_s) == (False, None)
    payload = json.loads(end.to_bytes())
    payload["usage"]["completion_tokens"] = -1
    with pytest.raises(ProtocolError) as info:
        TokenChunk.from_bytes(json.dumps(payload))
    assert "usage.completion_tokens" in str(info.value)


def test_error_codes_round_trip_in_a_chunk_and_as_service_headers() -> None:
    for code in ErrorCode:
        info = ErrorInfo(code=code, message=f"failed with {int(code)}")
        chunk = TokenChunk(request_id="r", seq=0, is_end=True, error=info)
        back = TokenChunk.from_bytes(chunk.to_bytes()).error
        assert back == info and back.code is code
        status, description = info.service_error()
        headers = {ERROR_CODE_HEADER: status, ERROR_HEADER: description}
        assert ErrorInfo.from_service_headers(headers) == info
    assert ErrorInfo(code=ErrorCode.UNAVAILABLE, message="x").type == "service_unavailable"
    assert ErrorInfo(code=ErrorCode.BAD_REQUEST, message="x").type == "invalid_request_error"
    assert (
        json.loads(ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="x").to_bytes())["code"]
        == 504
    )


def test_a_reply_without_error_headers_is_no_error() -> None:
    assert ErrorInfo.from_service_headers(None) is None
    assert ErrorInfo.from_service_headers({"Content-Type": "application/json"}) is None


def test_unknown_error_codes_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        ErrorInfo.from_service_headers({ERROR_CODE_HEADER: "418"})
    assert "418" in str(info.value)
    payload = json.loads(ErrorInfo(code=ErrorCode.SERVER_ERROR, message="x").to_bytes())
    payload["code"] = 418
    with pytest.raises(ProtocolError):
        ErrorInfo.from_bytes(json.dumps(payload))
    payload["code"] = 500
    assert ErrorInfo.from_bytes(json.dumps(payload)).code is ErrorCode.SERVER_ERROR


def test_streaming_is_on_the_wire_only_when_false() -> None:
    """A streamed request's bytes are what a worker that predates the field reads."""
    streamed = json.loads(REQUEST.to_bytes())
    assert "streaming" not in streamed and GenerateRequest.from_bytes(REQUEST.to_bytes()).streaming
    whole = REQUEST.model_copy(update={"streaming": False})
    assert json.loads(whole.to_bytes())["streaming"] is False
    assert GenerateRequest.from_bytes(whole.to_bytes()) == whole
