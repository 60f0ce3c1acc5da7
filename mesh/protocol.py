"""Wire messages of the mesh: strict, versioned pydantic models, JSON on the wire.

Every model forbids unknown fields, is immutable, and carries ``schema_version`` and a
``kind`` discriminator, so a receiver can tell a stale peer from a bug.

Cloud streaming protocol: an edge sends a ``GenerateRequest`` as a NATS request to
``subjects.cloud_generate(model)`` (or a worker's own subject), naming ``reply_subject``;
the worker that takes it replies ``GenerateAccepted`` and streams ``TokenChunk`` messages
to ``reply_subject``, ``seq`` 0, 1, 2, ..., the last one with ``is_end=True`` (and ``error``
set if it failed); an empty chunk is a keepalive. The edge reorders them with
``ChunkSequencer``. ``CancelRequest`` on ``subjects.cloud_cancel(model)`` stops a stream;
the worker also polls ``subjects.liveness(reply_subject)`` to notice a requester that
died. On failover, the edge resends the request to another worker with
``resume_token_ids`` = the tokens it already relayed.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mesh.errors import ProtocolError

logger = logging.getLogger(__name__)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "<message>"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class WireMessage(BaseModel):
    """Base of every mesh message: strict, frozen, versioned, JSON on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1

    def to_bytes(self) -> bytes:
        """Serialize to JSON bytes."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Self:
        """Parse JSON bytes; raise ``ProtocolError`` on bad JSON, schema or version."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ProtocolError(f"invalid {cls.__name__}: {_describe(exc)}") from exc


# -- fleet ------------------------------------------------------------------------------------


class NodeLoad(WireMessage):
    """How busy a node's engine is right now."""

    kind: Literal["node_load"] = "node_load"
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)
    kv_cache_usage: float = Field(ge=0.0, le=1.0)
    tokens_per_s: float = Field(ge=0.0)
    prefix_cache_hit_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    draining: bool = False
    # Cumulative wall seconds during which the engine had at least one request in it
    # (running or queued behind a running one), since the node started. Deltas of it
    # over a run, divided by the tokens served, give engine-seconds per token: a
    # verification pass and a decode step each count for the time they occupy the engine.
    engine_busy_s: float = Field(default=0.0, ge=0.0)


class NodeHeartbeat(WireMessage):
    """A node announcing itself and its load on ``subjects.node_load(node_id)``."""

    kind: Literal["node_heartbeat"] = "node_heartbeat"
    node_id: str = Field(min_length=1)
    role: Literal["edge", "cloud"]
    model: str = Field(min_length=1)
    version: str
    load: NodeLoad
    endpoint: str | None = None
    sent_at: float = Field(default_factory=time.time)
    simulated: bool = False  # the node runs a simulated engine (scale runs only)


# -- cloud streaming --------------------------------------------------------------------------


class SamplingParams(WireMessage):
    """Sampling settings of a generation; ``None`` means the engine's default."""

    kind: Literal["sampling_params"] = "sampling_params"
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None


class GenerateRequest(WireMessage):
    """Ask a cloud worker to generate (or continue, after failover) a chat completion."""

    kind: Literal["generate_request"] = "generate_request"
    request_id: str = Field(min_length=1)
    session_id: str | None = None
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    # Tokens the requester already has (streamed by a worker that then died): continue after them.
    resume_token_ids: list[int] = Field(default_factory=list)
    reply_subject: str = Field(min_length=1)
    deadline: float | None = None


class GenerateAccepted(WireMessage):
    """A worker's reply to a ``GenerateRequest``: it took the request; chunks follow."""

    kind: Literal["generate_accepted"] = "generate_accepted"
    request_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)


class ErrorInfo(WireMessage):
    """An OpenAI-style error carried in a stream's last chunk."""

    kind: Literal["error_info"] = "error_info"
    code: int
    type: str
    message: str


class TokenChunk(WireMessage):
    """One piece of a token stream; ``seq`` counts from 0, the last chunk has ``is_end``."""

    kind: Literal["token_chunk"] = "token_chunk"
    request_id: str = Field(min_length=1)
    seq: int = Field(ge=0)
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    is_end: bool = False
    error: ErrorInfo | None = None


# Sampled speculation truncates both distributions to their most probable tokens. The
# draft's q is exact whatever its width (the edge samples from the truncated q it
# sends), so a narrow one only costs acceptance and bytes. The target's is the
# approximation: vLLM gives at most ``max_logprobs`` prompt logprobs per position,
# and every one is a Python object, so it is wide but finite (see docs/architecture.md
# for the probability mass this leaves out).
DRAFT_TOP_K = 20
TARGET_TOP_K = 128


def top_k_distribution(
    token_ids: np.ndarray, scores: np.ndarray, temperature: float, top_p: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sampling distribution of speculative decoding at one position, on both sides.

    ``scores`` are logits or logprobs of ``token_ids`` (any additive constant cancels).
    Temperature divides them, as in softmax(logits / T); only the ``k`` highest-scoring
    tokens keep probability (top-k after temperature equals top-k before: the order
    does not change), renormalized; then top-p keeps the fewest most probable tokens
    whose mass reaches ``top_p``, as vLLM does. The edge drafts from exactly this
    distribution of its own logits (``DRAFT_TOP_K``); the worker builds the target's from
    vLLM's top ``TARGET_TOP_K`` logprobs: the tail beyond them is the one approximation.
    """
    assert temperature > 0 and 0 < top_p <= 1
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    scaled = scores[top].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1:
        # Keep a token while the mass before it is below top_p (the first always stays).
        keep = (np.cumsum(probs) - probs) < top_p
        probs = probs[keep] / probs[keep].sum()
        top = top[keep]
    # Tokens that underflowed to probability 0 cannot be sampled: leave them out.
    positive = probs > 0
    return token_ids[top[positive]], probs[positive]


class DraftDistribution(WireMessage):
    """The draft model's distribution at one drafted position (``top_k_distribution``).

    The edge samples its draft token from exactly this distribution, so q on the
    wire is exact; the drafted token is always in it.
    """

    kind: Literal["draft_distribution"] = "draft_distribution"
    token_ids: list[int] = Field(min_length=1, max_length=DRAFT_TOP_K)
    probs: list[float] = Field(min_length=1, max_length=DRAFT_TOP_K)

    @model_validator(mode="after")
    def _is_a_distribution(self) -> Self:
        if len(self.token_ids) != len(self.probs):
            raise ValueError("token_ids and probs differ in length")
        if min(self.probs) <= 0 or abs(sum(self.probs) - 1) > 1e-4:
            raise ValueError("probs must be positive and sum to 1")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("token_ids repeat")
        return self

    def dense(self, vocab_size: int) -> np.ndarray:
        """The distribution as a vocabulary-sized probability vector."""
        row = np.zeros(vocab_size)
        row[self.token_ids] = self.probs
        return row


class VerifyRequest(WireMessage):
    """Ask a worker to score an edge's draft tokens after a context.

    ``context_token_ids`` is the whole prompt plus every token confirmed so far;
    the worker's prefix cache makes re-sending it cheap. Greedy unless ``sampling``
    has a temperature above 0; then ``draft_distributions`` carries q at each
    drafted position and the worker applies the rejection-sampling rule.
    """

    kind: Literal["verify_request"] = "verify_request"
    request_id: str = Field(min_length=1)
    session_id: str | None = None
    model: str = Field(min_length=1)
    context_token_ids: list[int] = Field(min_length=1)
    draft_token_ids: list[int] = Field(min_length=1, max_length=64)
    sampling: SamplingParams | None = None
    draft_distributions: list[DraftDistribution] | None = None
    deadline: float | None = None

    @property
    def sampled(self) -> bool:
        """Whether the rejection-sampling rule applies (temperature above 0)."""
        return self.sampling is not None and (self.sampling.temperature or 0.0) > 0

    @model_validator(mode="after")
    def _distributions_match_the_draft(self) -> Self:
        if not self.sampled:
            if self.draft_distributions is not None:
                raise ValueError("draft_distributions are for sampled verification only")
            return self
        dists = self.draft_distributions
        if dists is None or len(dists) != len(self.draft_token_ids):
            raise ValueError("sampled verification needs one draft distribution per draft token")
        for i, (token, dist) in enumerate(zip(self.draft_token_ids, dists, strict=True)):
            if token not in dist.token_ids:
                raise ValueError(f"draft token {i} is not in its draft distribution")
        return self


class VerifyReply(WireMessage):
    """How many drafts the target accepts and the token it emits after them.

    ``context_len`` (and ``request_id``) echo the request so a requester can reject
    a reply that does not match its state instead of splicing it in. ``margins``
    (greedy only) is the target's top-1 minus top-2 logprob at each draft position
    and at the next token's position: a small margin marks a numerical near-tie.
    """

    kind: Literal["verify_reply"] = "verify_reply"
    request_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    context_len: int = Field(ge=1)
    accepted: int = Field(ge=0)
    next_token: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)
    margins: list[float] = Field(default_factory=list)


class CancelRequest(WireMessage):
    """Stop generating for ``request_id`` (the requester went away)."""

    kind: Literal["cancel_request"] = "cancel_request"
    request_id: str = Field(min_length=1)


Message = Annotated[
    NodeHeartbeat
    | GenerateRequest
    | GenerateAccepted
    | TokenChunk
    | CancelRequest
    | VerifyRequest
    | VerifyReply,
    Field(discriminator="kind"),
]
_MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def parse_message(data: bytes | str) -> Message:
    """Parse any top-level message by its ``kind``; raise ``ProtocolError`` if invalid."""
    try:
        return _MESSAGE_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"invalid message: {_describe(exc)}") from exc


# -- stream ordering --------------------------------------------------------------------------


class ChunkSequencer:
    """Put one stream's ``TokenChunk``s back in ``seq`` order; drop duplicates; detect loss.

    ``push`` returns the chunks that became deliverable, in order. A chunk still missing
    once ``max_gap`` later chunks have arrived, or when ``finish`` is called, is lost:
    ``ProtocolError``.
    """

    def __init__(self, request_id: str | None = None, *, max_gap: int = 32) -> None:
        self._request_id = request_id
        self._max_gap = max_gap
        self._next_seq = 0
        self._pending: dict[int, TokenChunk] = {}
        self._end_seq: int | None = None

    @property
    def next_seq(self) -> int:
        """The seq of the next chunk to deliver."""
        return self._next_seq

    @property
    def done(self) -> bool:
        """Whether the end chunk has been delivered."""
        return self._end_seq is not None and self._next_seq > self._end_seq

    def missing(self) -> list[int]:
        """Seqs known to be missing (below the highest seq seen)."""
        if not self._pending:
            return []
        return [s for s in range(self._next_seq, max(self._pending)) if s not in self._pending]

    def push(self, chunk: TokenChunk) -> list[TokenChunk]:
        """Accept one chunk in arrival order; return the chunks now deliverable, in order."""
        self._check_request(chunk)
        if chunk.seq < self._next_seq or chunk.seq in self._pending:
            logger.debug("dropping duplicate chunk %s of %s", chunk.seq, chunk.request_id)
            return []
        self._check_end(chunk)
        self._pending[chunk.seq] = chunk
        ready = self._drain()
        if len(self._pending) > self._max_gap:
            raise ProtocolError(
                f"stream {chunk.request_id}: chunk {self._next_seq} lost "
                f"({len(self._pending)} later chunks arrived without it)"
            )
        return ready

    def finish(self) -> None:
        """Declare the stream over; raise ``ProtocolError`` if chunks or the end are missing."""
        if self.done:
            return
        if self._pending:
            raise ProtocolError(f"stream ended with chunks {self.missing()} missing")
        raise ProtocolError(f"stream ended after chunk {self._next_seq - 1} without an end chunk")

    def _check_request(self, chunk: TokenChunk) -> None:
        if self._request_id is None:
            self._request_id = chunk.request_id
        elif chunk.request_id != self._request_id:
            raise ProtocolError(
                f"chunk of request {chunk.request_id} in the stream of {self._request_id}"
            )

    def _check_end(self, chunk: TokenChunk) -> None:
        if chunk.is_end:
            if self._end_seq is not None:
                raise ProtocolError(f"two end chunks ({self._end_seq} and {chunk.seq})")
            if self._pending and max(self._pending) > chunk.seq:
                raise ProtocolError(f"end chunk {chunk.seq} precedes chunk {max(self._pending)}")
            self._end_seq = chunk.seq
        elif self._end_seq is not None and chunk.seq > self._end_seq:
            raise ProtocolError(f"chunk {chunk.seq} after the end chunk {self._end_seq}")

    def _drain(self) -> list[TokenChunk]:
        ready = []
        while self._next_seq in self._pending:
            ready.append(self._pending.pop(self._next_seq))
            self._next_seq += 1
        return ready
