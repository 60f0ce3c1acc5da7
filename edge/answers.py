"""Turning engine events into OpenAI answers: whole JSON bodies or SSE chunk streams.

The engine yields token events; this module applies tool-call parsing, builds
the exact OpenAI objects (``chat.completion``, ``chat.completion.chunk``,
``text_completion``), and records latency and token metrics as they happen.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from edge.errors import EdgeError, EngineError
from edge.generation import Events, FinishEvent, GenerationStats, TokenEvent
from edge.metrics import EdgeMetrics
from edge.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    EscalationUsage,
    FunctionCall,
    PromptTokensDetails,
    SpeculativeUsage,
    TandemUsage,
    ToolCall,
    ToolCallDelta,
    Usage,
    new_id,
    unix_now,
)
from edge.tool_calls import ParsedToolCall, ToolCallParse, ToolCallStream, parse_tool_calls

# ``system_fingerprint`` of answers a simulated engine produced (scale runs only).
SIMULATED_FINGERPRINT = "tandem-simulated-engine"


@dataclass
class AnswerContext:
    """Per-request facts the answer needs: identity, the route it took, timing, metrics.

    Set once when the answer starts; the answer's own facts (a mid-answer handover,
    speculative counts) arrive in the finish event's stats."""

    model: str
    node_id: str
    metrics: EdgeMetrics
    endpoint: str
    route: str = "edge"
    rule: str | None = None
    include_usage: bool = False
    tool_names: set[str] | None = None  # None: the request has no active tools
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=unix_now)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    n_tokens: int = 0
    # Told of every finished answer (the router learns cloud latency, acceptance, budgets).
    on_done: Callable[[AnswerContext, GenerationStats], None] | None = None

    def on_token(self, event: TokenEvent) -> None:
        """Record token timing (TTFT on the first one)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.started)
        self.n_tokens += len(event.token_ids)

    def on_finish(self, stats: GenerationStats, status: str = "200") -> None:
        """Record the end of the request in the metrics."""
        now = time.perf_counter()
        m = self.metrics
        m.e2e.observe(now - self.started)
        if self.first_token_at is not None and self.n_tokens > 1:
            m.tpot.observe((now - self.first_token_at) / (self.n_tokens - 1))
        m.prompt_tokens.inc(stats.prompt_tokens)
        m.cached_prompt_tokens.inc(stats.cached_tokens)
        m.completion_tokens.inc(stats.completion_tokens)
        m.requests.labels(self.endpoint, self.route, status).inc()
        m.drafted_tokens.inc(stats.drafted)
        m.accepted_tokens.inc(stats.accepted)
        m.verify_rounds.inc(stats.verify_rounds)
        if self.on_done is not None:
            self.on_done(self, stats)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def usage(self, stats: GenerationStats) -> Usage:
        """The usage block, with Tandem's route facts nested in it."""
        return Usage(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            total_tokens=stats.prompt_tokens + stats.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens),
            tandem=TandemUsage(
                route=self.route,
                node_id=self.node_id,
                queue_ms=round(stats.queue_s * 1000, 3),
                cached_prompt_tokens=stats.cached_tokens,
                worker_id=stats.worker_id,
                rule=self.rule,
                speculative=_speculative_usage(stats),
                escalation=_escalation_usage(stats),
                simulated=stats.simulated,
                simulated_engine_ms=_ms(stats.engine_s),
            ),
        )

    def parse_tools(self, text: str, finish: FinishEvent) -> ToolCallParse:
        """Split a whole answer into content and tool calls (none without tools)."""
        if self.tool_names is None:
            return ToolCallParse(content=text)
        parsed = parse_tool_calls(text, self.tool_names)
        self.metrics.malformed_tool_calls.inc(len(parsed.malformed))
        return with_generator_calls(parsed, finish)


def with_generator_calls(parsed: ToolCallParse, finish: FinishEvent) -> ToolCallParse:
    """Prefer the calls the generator parsed itself (the cloud's configured vLLM parser)."""
    if finish.tool_calls is None:
        return parsed
    calls = [
        ParsedToolCall(
            id=c.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            name=c["function"]["name"],
            arguments=c["function"]["arguments"],
        )
        for c in finish.tool_calls
    ]
    return ToolCallParse(
        content=parsed.content, calls=calls, malformed=[] if calls else parsed.malformed
    )


def _escalation_usage(stats: GenerationStats) -> EscalationUsage | None:
    handover = stats.handover
    if handover is None:
        return None
    return EscalationUsage(
        at_token=handover.at_token, mean_logprob=handover.mean_logprob, to=handover.to
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _speculative_usage(stats: GenerationStats) -> SpeculativeUsage | None:
    if not stats.verify_rounds:
        return None
    return SpeculativeUsage(
        drafted=stats.drafted,
        accepted=stats.accepted,
        verify_rounds=stats.verify_rounds,
        acceptance_rate=round(stats.accepted / max(1, stats.drafted), 4),
        tokens_per_verify=round(stats.completion_tokens / stats.verify_rounds, 3),
        pipelined_rounds=stats.pipelined_rounds,
        fell_back_to_edge=stats.fell_back,
    )


def _finish_reason(stats: GenerationStats, parsed: ToolCallParse) -> str:
    return "tool_calls" if parsed.calls else (stats.finish_reason or "stop")


def _tool_calls(parsed: ToolCallParse) -> list[ToolCall] | None:
    if not parsed.calls:
        return None
    return [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in parsed.calls
    ]


async def _drain(events: Events, ctx: AnswerContext) -> tuple[str, FinishEvent]:
    """Collect all text of a generation.

    Every consumer runs the event stream to its end (it ends right after the
    finish event), so the generator's clean-up (freeing a slot, unsubscribing)
    runs now, not whenever the garbage collector finalizes it.
    """
    parts: list[str] = []
    finish: FinishEvent | None = None
    async for event in events:
        parts.append(event.text)
        if isinstance(event, FinishEvent):
            ctx.on_finish(event.stats)
            finish = event
        else:
            ctx.on_token(event)
    if finish is None:
        raise EngineError("the generation ended without a finish event")
    return "".join(parts), finish


async def collect_chat(events: Events, ctx: AnswerContext) -> ChatCompletion:
    """A whole ``chat.completion`` body."""
    text, finish = await _drain(events, ctx)
    stats = finish.stats
    parsed = ctx.parse_tools(text, finish)
    message = ChatMessageOut(content=parsed.content, tool_calls=_tool_calls(parsed))
    return ChatCompletion(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=[ChatChoice(message=message, finish_reason=_finish_reason(stats, parsed))],
        usage=ctx.usage(stats),
        system_fingerprint=SIMULATED_FINGERPRINT if stats.simulated else None,
    )


async def collect_completion(events: Events, ctx: AnswerContext) -> Completion:
    """A whole ``text_completion`` body."""
    text, finish = await _drain(events, ctx)
    stats = finish.stats
    choice = CompletionChoice(text=text, finish_reason=stats.finish_reason or "stop")
    return Completion(
        id=ctx.id, created=ctx.created, model=ctx.model, choices=[choice], usage=ctx.usage(stats)
    )


def sse(payload: dict[str, object] | str) -> bytes:
    """One server-sent event line."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


class _ChatChunks:
    """Builds ``chat.completion.chunk`` events in OpenAI's exact shape."""

    def __init__(self, ctx: AnswerContext) -> None:
        self.ctx = ctx

    def chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=self.ctx.id,
            created=self.ctx.created,
            model=self.ctx.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
        ).model_dump(exclude={"usage"} if not self.ctx.include_usage else set())
        # OpenAI omits unset delta fields rather than sending nulls.
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return sse(body)

    def usage_chunk(self, stats: GenerationStats) -> bytes:
        body = ChatCompletionChunk(
            id=self.ctx.id,
            created=self.ctx.created,
            model=self.ctx.model,
            choices=[],
            usage=self.ctx.usage(stats),
            system_fingerprint=SIMULATED_FINGERPRINT if stats.simulated else None,
        )
        return sse(body.model_dump())


async def stream_chat(events: Events, ctx: AnswerContext) -> AsyncIterator[bytes]:
    """SSE chunks of a chat answer, ending with ``[DONE]``."""
    chunks = _ChatChunks(ctx)
    tools = ToolCallStream(ctx.tool_names) if ctx.tool_names is not None else None
    try:
        yield chunks.chunk(ChatDelta(role="assistant", content=""))
        async for event in events:
            text = tools.push(event.text) if tools else event.text
            if text:
                yield chunks.chunk(ChatDelta(content=text))
            if isinstance(event, FinishEvent):
                for item in _stream_tail(chunks, tools, event):
                    yield item
                ctx.on_finish(event.stats)
            else:
                ctx.on_token(event)
    except EdgeError as exc:
        # Headers are gone already; the error travels as an event, like vLLM does.
        ctx.metrics.requests.labels(ctx.endpoint, ctx.route, str(exc.status)).inc()
        yield sse(exc.body())
    yield sse("[DONE]")


def _stream_tail(
    chunks: _ChatChunks, tools: ToolCallStream | None, finish: FinishEvent
) -> list[bytes]:
    out: list[bytes] = []
    stats = finish.stats
    parsed = tools.finish() if tools else ToolCallParse(content=None)
    if tools:
        chunks.ctx.metrics.malformed_tool_calls.inc(len(parsed.malformed))
        parsed = with_generator_calls(parsed, finish)
    if parsed.content:
        out.append(chunks.chunk(ChatDelta(content=parsed.content)))
    for i, call in enumerate(parsed.calls):
        delta = ToolCallDelta(
            index=i, id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)
        )
        out.append(chunks.chunk(ChatDelta(tool_calls=[delta])))
    out.append(chunks.chunk(ChatDelta(), finish_reason=_finish_reason(stats, parsed)))
    if chunks.ctx.include_usage:
        out.append(chunks.usage_chunk(stats))
    return out


async def stream_completion(events: Events, ctx: AnswerContext) -> AsyncIterator[bytes]:
    """SSE chunks of a text completion, ending with ``[DONE]``."""

    def chunk(text: str, finish: str | None, usage: Usage | None = None) -> bytes:
        choices = [CompletionChoice(text=text, finish_reason=finish)] if usage is None else []
        body = Completion(
            id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage
        )
        return sse(body.model_dump(exclude={"usage"} if not ctx.include_usage else set()))

    try:
        async for event in events:
            if isinstance(event, FinishEvent):
                yield chunk(event.text, event.stats.finish_reason or "stop")
                if ctx.include_usage:
                    yield chunk("", None, ctx.usage(event.stats))
                ctx.on_finish(event.stats)
                continue
            ctx.on_token(event)
            if event.text:
                yield chunk(event.text, None)
    except EdgeError as exc:
        ctx.metrics.requests.labels(ctx.endpoint, ctx.route, str(exc.status)).inc()
        yield sse(exc.body())
    yield sse("[DONE]")
