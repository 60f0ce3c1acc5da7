"""Wire messages: round trips, strictness, versioning, and stream ordering."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mesh.errors import ProtocolError
from mesh.protocol import (
    CancelRequest,
    ChunkSequencer,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    NodeHeartbeat,
    NodeLoad,
    SamplingParams,
    TokenChunk,
    parse_message,
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


def chunk(seq: int, *, is_end: bool = False, request_id: str = "req-1") -> TokenChunk:
    """A chunk carrying token ``seq``."""
    return TokenChunk(
        request_id=request_id, seq=seq, token_ids=[seq], text=f"t{seq}", is_end=is_end
    )


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
            usage={"completion_tokens": 4},
            is_end=True,
            error=ErrorInfo(code=503, type="overloaded", message="busy"),
        ),
        CancelRequest(request_id="req-1"),
        GenerateAccepted(request_id="req-1", worker_id="cloud-1"),
    ],
)
def test_round_trip_through_bytes(message: NodeLoad) -> None:
    data = message.to_bytes()
    assert type(message).from_bytes(data) == message
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


def test_parse_message_dispatches_on_kind() -> None:
    assert parse_message(REQUEST.to_bytes()) == REQUEST
    assert parse_message(BEAT.to_bytes()) == BEAT
    assert isinstance(parse_message(chunk(0).to_bytes()), TokenChunk)
    with pytest.raises(ProtocolError):
        parse_message(b'{"kind": "teleport", "schema_version": 1}')
    assert isinstance(parse_message(CancelRequest(request_id="x").to_bytes()), CancelRequest)


# -- ChunkSequencer ---------------------------------------------------------------------------


def _seqs(chunks: list[TokenChunk]) -> list[int]:
    return [c.seq for c in chunks]


def test_sequencer_passes_in_order_chunks_through() -> None:
    sequencer = ChunkSequencer("req-1")
    delivered = [c for seq in range(3) for c in sequencer.push(chunk(seq, is_end=seq == 2))]
    assert _seqs(delivered) == [0, 1, 2]
    assert sequencer.done
    sequencer.finish()


def test_sequencer_reorders() -> None:
    sequencer = ChunkSequencer()
    assert sequencer.push(chunk(1)) == []
    assert sequencer.push(chunk(3, is_end=True)) == []
    assert sequencer.missing() == [0, 2]
    assert _seqs(sequencer.push(chunk(0))) == [0, 1]
    assert _seqs(sequencer.push(chunk(2))) == [2, 3]
    assert sequencer.done


def test_sequencer_drops_duplicates() -> None:
    sequencer = ChunkSequencer()
    assert _seqs(sequencer.push(chunk(0))) == [0]
    assert sequencer.push(chunk(0)) == []
    assert sequencer.push(chunk(2)) == []
    assert sequencer.push(chunk(2)) == []
    assert _seqs(sequencer.push(chunk(1))) == [1, 2]
    assert sequencer.next_seq == 3


def test_sequencer_detects_a_gap_after_max_gap_chunks() -> None:
    sequencer = ChunkSequencer(max_gap=3)
    sequencer.push(chunk(0))
    for seq in (2, 3, 4):
        assert sequencer.push(chunk(seq)) == []
    with pytest.raises(ProtocolError) as info:
        sequencer.push(chunk(5))
    assert "chunk 1 lost" in str(info.value)


def test_sequencer_detects_a_gap_at_the_end() -> None:
    sequencer = ChunkSequencer()
    sequencer.push(chunk(0))
    sequencer.push(chunk(2, is_end=True))
    with pytest.raises(ProtocolError) as info:
        sequencer.finish()
    assert "[1]" in str(info.value)


def test_sequencer_detects_a_truncated_stream() -> None:
    sequencer = ChunkSequencer()
    sequencer.push(chunk(0))
    with pytest.raises(ProtocolError) as info:
        sequencer.finish()
    assert "without an end chunk" in str(info.value)


def test_sequencer_rejects_chunks_after_the_end_and_of_other_requests() -> None:
    sequencer = ChunkSequencer()
    sequencer.push(chunk(0, is_end=True))
    with pytest.raises(ProtocolError):
        sequencer.push(chunk(1))
    with pytest.raises(ProtocolError):
        sequencer.push(chunk(1, request_id="req-2"))
    assert sequencer.done
