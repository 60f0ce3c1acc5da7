"""Wire messages of the mesh: strict, versioned pydantic models, JSON on the wire.

Every model forbids unknown fields, is immutable, and carries ``schema_version`` and a
``kind`` discriminator, so a receiver can tell a stale peer from a bug.

Cloud streaming protocol: an edge sends a ``GenerateRequest`` as a NATS request to
``subjects.cloud_generate(model)`` (or a worker's own subject), naming ``reply_subject``;
the worker that takes it replies ``GenerateAccepted`` and streams ``TokenChunk`` messages
to ``reply_subject``, ``seq`` 0, 1, 2, ..., the last one with ``is_end=True`` (and ``error``
set if it failed); an empty chunk is a keepalive. The edge reorders them with
``mesh.sequencer.ChunkSequencer``. ``CancelRequest`` on ``subjects.cloud_cancel(model,
requester)`` stops a stream (from the requester only); the worker also polls
``subjects.liveness(reply_subject)`` to notice a requester that died. On failover, the
edge resends the request to another worker with ``resume_token_ids`` = the tokens it
already relayed.

Errors have one vocabulary, ``ErrorCode``: a worker sends one in a stream's last
chunk (``ErrorInfo``) or as a refused request's micro-service error headers, and
the edge reads both back into an ``ErrorInfo``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, Literal, Self

import numpy as np
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh.errors import ProtocolError
from mesh.grammar import MAX_TOOL_CALLS
from mesh.sampling import DRAFT_TOP_K, MAX_TOP_LOGPROBS


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
        """Serialize to JSON bytes (``model_dump_json``'s bytes, without its detour
        through ``str``: every token chunk goes through here)."""
        return self.__pydantic_serializer__.to_json(self)

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
    # Cumulative since the node started, for the planner's demand (cloud.planner): the
    # generate requests admitted and their prompt and output tokens. Optional: a node
    # that predates them sends None, and the planner falls back to its configured means.
    requests_total: int | None = Field(default=None, ge=0)
    prompt_tokens_total: int | None = Field(default=None, ge=0)
    output_tokens_total: int | None = Field(default=None, ge=0)
    # Cumulative tokens the engine computed: prompt tokens not read from its prefix cache
    # plus generated ones. A compute-bound engine's step time (vLLM on CPU) grows with
    # the tokens in it, so a request's share of a step shared with other traffic is its
    # share of these: what a route costs beside ``engine_busy_s``, which charges a
    # verification alone in a step the whole step. None from an engine that cannot tell.
    engine_tokens_computed: int | None = Field(default=None, ge=0)


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
    # A cloud worker's part in a disaggregated deployment (cloud.settings.WorkerRole):
    # "both" (monolithic), "prefill" (serves decode workers only, never edges) or "decode".
    # None from edges and from workers that predate the roles (they are "both").
    worker_role: Literal["prefill", "decode", "both"] | None = None


# -- cloud streaming --------------------------------------------------------------------------


class OutputConstraint(WireMessage):
    """Decoding constrained to JSON, or to tool calls (``mesh.grammar`` says exactly how).

    ``json_schema`` None: any JSON object. ``tool_calls`` > 0: the answer is 1 to
    that many Hermes blocks ``<tool_call>\n{...}\n</tool_call>``, each object valid
    against ``json_schema`` (which names the function and its arguments). ``lazy``:
    the answer is free text until the model writes ``<tool_call>`` and the blocks are
    constrained from there (``tool_choice: auto`` with ``strict`` tools).
    """

    kind: Literal["output_constraint"] = "output_constraint"
    json_schema: dict[str, Any] | None = None
    tool_calls: int = Field(default=0, ge=0, le=MAX_TOOL_CALLS)
    lazy: bool = False

    @model_validator(mode="after")
    def _lazy_is_for_tool_calls(self) -> Self:
        if self.lazy and not self.tool_calls:
            raise ValueError("a lazy constraint constrains tool calls (tool_calls > 0)")
        return self


class SamplingParams(WireMessage):
    """Sampling settings of a generation; ``None`` means the engine's default."""

    kind: Literal["sampling_params"] = "sampling_params"
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    constraint: OutputConstraint | None = None
    # Return log-probabilities of the chosen tokens and this many alternatives each.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenLogprob(WireMessage):
    """The target model's log-probability of one emitted token, and its top alternatives
    (most probable first): OpenAI's ``logprobs.content`` entry, as token ids."""

    kind: Literal["token_logprob"] = "token_logprob"
    logprob: float
    top_ids: list[int] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)
    top_logprobs: list[float] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)


class RenderedPrompt(WireMessage):
    """A chat's prompt as the edge rendered and tokenized it, for the worker to reuse.

    A pair's edge and cloud models share one tokenizer and one chat template (the
    catalog's contract, which the speculative route's token ids already rely on), so
    the worker would compute the same ids again. It renders the text itself (cheap:
    the template) and uses ``token_ids`` only when its own text hashes to
    ``text_sha256``; tokenizing, the larger cost, is skipped (issue 19).
    """

    token_ids: list[int] = Field(min_length=1)
    text_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @staticmethod
    def digest(text: str) -> str:
        """The ``text_sha256`` of a rendered prompt: one definition for both sides."""
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def of(cls, text: str, token_ids: list[int]) -> RenderedPrompt:
        """The prompt ``text`` rendered to, tokenized as ``token_ids``."""
        return cls(token_ids=token_ids, text_sha256=cls.digest(text))


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
    # False: the requester's client is not streaming (it sees the answer only whole), so
    # the worker may hold tokens after the first, sending what it has once per keepalive
    # period (a failover still resumes from them) and the rest in the end chunk: one
    # message per ~half second of decoding instead of one per token. Left out of the
    # JSON when True, so a streaming request reads the same to a worker that predates it.
    streaming: bool = True
    # The edge's rendering and token ids of the prompt (``RenderedPrompt``); None: the
    # worker tokenizes. Left out of the JSON when None, like ``streaming`` when True.
    prompt: RenderedPrompt | None = None

    def to_bytes(self) -> bytes:
        """JSON bytes; ``streaming`` only when False and ``prompt`` only when set (see
        the fields), so a request without them reads the same to an older worker."""
        left_out = set()
        if self.streaming:
            left_out.add("streaming")
        if self.prompt is None:
            left_out.add("prompt")
        return self.__pydantic_serializer__.to_json(self, exclude=left_out or None)


class GenerateAccepted(WireMessage):
    """A worker's reply to a ``GenerateRequest``: it took the request; chunks follow."""

    kind: Literal["generate_accepted"] = "generate_accepted"
    request_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)


class ErrorCode(IntEnum):
    """Why a request failed on the mesh: an HTTP status, shared by worker and edge."""

    BAD_REQUEST = 400  # the request cannot be served as asked
    SERVER_ERROR = 500  # the engine failed on it
    BAD_REPLY = 502  # the edge got a reply or stream it cannot use
    UNAVAILABLE = 503  # the worker is draining: try another
    DEADLINE_EXCEEDED = 504  # the requester's deadline passed

    @property
    def openai_type(self) -> str:
        """The OpenAI error ``type`` of this code."""
        return _OPENAI_TYPES[self]


_OPENAI_TYPES = {
    ErrorCode.BAD_REQUEST: "invalid_request_error",
    ErrorCode.SERVER_ERROR: "server_error",
    ErrorCode.BAD_REPLY: "server_error",
    ErrorCode.UNAVAILABLE: "service_unavailable",
    ErrorCode.DEADLINE_EXCEEDED: "timeout",
}


class ErrorInfo(WireMessage):
    """An error of a worker's: in a stream's last chunk, or as a refused request's headers."""

    kind: Literal["error_info"] = "error_info"
    code: ErrorCode
    message: str

    @property
    def type(self) -> str:
        """The OpenAI error ``type``."""
        return self.code.openai_type

    def service_error(self) -> tuple[str, str]:
        """The (code, description) pair of a NATS micro service's ``respond_error``."""
        return str(int(self.code)), self.message

    @classmethod
    def from_service_headers(cls, headers: Mapping[str, str] | None) -> ErrorInfo | None:
        """The error a micro service answered with (its error headers), or None if none."""
        code = (headers or {}).get(ERROR_CODE_HEADER)
        if code is None:
            return None
        message = (headers or {}).get(ERROR_HEADER, "rejected")
        try:
            return cls(code=ErrorCode(int(code)), message=message)
        except ValueError as exc:
            raise ProtocolError(f"unknown service error code {code!r}: {message}") from exc


class StreamUsage(WireMessage):
    """What a cloud answer cost, in a stream's end chunk."""

    kind: Literal["stream_usage"] = "stream_usage"
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    worker_id: str = Field(min_length=1)
    simulated: bool = False  # a simulated engine served it (scale runs only)
    engine_s: float | None = Field(default=None, ge=0.0)  # simulated: modelled engine time


class TokenChunk(WireMessage):
    """One piece of a token stream; ``seq`` counts from 0, the last chunk has ``is_end``."""

    kind: Literal["token_chunk"] = "token_chunk"
    request_id: str = Field(min_length=1)
    seq: int = Field(ge=0)
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    usage: StreamUsage | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    is_end: bool = False
    error: ErrorInfo | None = None


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
    # When the sampling asks for logprobs: one per emitted token (the accepted drafts,
    # then next_token), from the target model.
    logprobs: list[TokenLogprob] | None = None


class PrefillRequest(WireMessage):
    """A decode worker asks a prefill worker to compute a prompt's KV (``max_tokens=1``) and
    hand it over through the KV connector (``subjects.cloud_prefill``).

    ``prompt_token_ids`` is exactly what the decode worker will feed its engine (prompt
    plus any resumed tokens), so the connector finds the KV by the same tokens.
    ``kv_transfer_params`` is what vLLM's connector wants on the producing request
    (``{"do_remote_decode": true, ...}`` for NixlConnector; ignored by shared storage).
    """

    kind: Literal["prefill_request"] = "prefill_request"
    request_id: str = Field(min_length=1)
    session_id: str | None = None
    model: str = Field(min_length=1)
    prompt_token_ids: list[int] = Field(min_length=1)
    kv_transfer_params: dict[str, Any] | None = None
    deadline: float | None = None


class PrefillReply(WireMessage):
    """The prefill worker computed the KV: the connector holds it for the decode worker.

    ``kv_transfer_params`` come from vLLM's finished producing request (where to pull
    the blocks from, for NixlConnector); the decode worker passes them to its own
    request unchanged. ``first_token`` is the prefill's one greedy token (information
    only: the decode worker samples its own first token with the request's sampling).
    """

    kind: Literal["prefill_reply"] = "prefill_reply"
    request_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    prompt_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)  # of them, found in the prefill worker's own cache
    first_token: int | None = Field(default=None, ge=0)
    kv_transfer_params: dict[str, Any] | None = None
    simulated: bool = False
    engine_s: float | None = Field(default=None, ge=0.0)  # simulated: modelled prefill time


class CancelRequest(WireMessage):
    """Stop generating for ``request_id`` (the requester went away)."""

    kind: Literal["cancel_request"] = "cancel_request"
    request_id: str = Field(min_length=1)


# -- planner ---------------------------------------------------------------------------------


class PlannerDecision(WireMessage):
    """One step of the fleet planner (``cloud.planner``) on ``subjects.planner_decisions``,
    with the inputs it decided from: what it saw, forecast, and sized the pool to."""

    kind: Literal["planner_decision"] = "planner_decision"
    pool: str = Field(min_length=1)
    planner_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    at: float = Field(default_factory=time.time)
    config_revision: int | None = None
    action: Literal["hold", "scale_up", "scale_down", "error"]
    reason: str
    provisioned: int = Field(ge=0)  # workers the connector runs (ready or starting)
    ready: int = Field(ge=0)  # of them, heard from and not draining
    desired: int = Field(ge=0)  # what sizing asked for, before bounds and cooldowns
    target: int = Field(ge=0)  # what the planner set the pool to
    measured_rps: float = Field(ge=0.0)
    forecast_rps: float = Field(ge=0.0)  # demand sized for over the lead time: mean + band
    forecast_mean_rps: float = 0.0  # the forecaster's mean at that horizon
    forecast_band_rps: float = Field(default=0.0, ge=0.0)  # z·std, bounded (band_max_share)
    capacity_rps: float = Field(ge=0.0)  # one replica's arrivals within the SLO
    waiting: int = Field(ge=0)
    ttft_target_ms: float = Field(gt=0)
    itl_target_ms: float = Field(gt=0)
    headroom: float  # 1 - forecast / (ready x capacity): below 0 the SLO is at risk
    drained: str | None = None  # the worker chosen to drain on a scale-down
    error: str | None = None


# -- policy ------------------------------------------------------------------------------------


class PolicyApplied(WireMessage):
    """An edge's report on ``subjects.policy_applied()``: it applied (or refused) a revision."""

    kind: Literal["policy_applied"] = "policy_applied"
    node_id: str = Field(min_length=1)
    revision: int = Field(ge=1)
    applied: bool
    error: str | None = None
