"""Stream ordering: the receiver restores seq order, drops duplicates, detects loss."""

from __future__ import annotations

import pytest

from mesh.errors import ProtocolError
from mesh.protocol import TokenChunk
from mesh.sequencer import ChunkSequencer


def chunk(seq: int, *, is_end: bool = False, request_id: str = "req-1") -> TokenChunk:
    """A chunk carrying token ``seq``."""
    return TokenChunk(
        request_id=request_id, seq=seq, token_ids=[seq], text=f"t{seq}", is_end=is_end
    )


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
