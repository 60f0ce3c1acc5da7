"""Turning engine events into OpenAI answers: whole JSON bodies or SSE chunk streams.

The engine yields token events; this module applies tool-call parsing, builds
the exact OpenAI objects (``chat.completion``, ``chat.completion.chunk``,
``text_completion``), and records latency and token metrics as they happen.
A streamed chat answer runs one loop, ``chat_pieces`` (its text as it becomes safe to
show, then its end), which chat chunks and the Responses event stream both render.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

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
    ChatTokenLogprob,
    ChoiceLogprobs,
    CloudFallbackUsage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    EscalationUsage,
    FunctionCall,
    PromptTokensDetails,
    SpeculativeUsage,
    TandemUsage,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
    unix_now,
)
from edge.tool_calls import ParsedToolCall, ToolCallParse, ToolCallStream, parse_tool_calls
from mesh.protocol import TokenLogprob

A = TypeVar("A", ChatCompletion, Completion)

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
    # Set when the request asks for logprobs: a token id's bytes (event-loop thread only).
    token_bytes: Callable[[int], bytes] | None = None
    index: int = 0  # the choice this context answers, of ``n``
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=unix_now)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    n_tokens: int = 0
    stats: GenerationStats | None = None  # once the answer is done
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
        self.stats = stats
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

    def on_error(self, exc: EdgeError) -> None:
        """Count a request that failed after its stream began (its status is in the body)."""
        self.metrics.requests.labels(self.endpoint, self.route, str(exc.status)).inc()

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
                fallback=_fallback_usage(stats),
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


def _fallback_usage(stats: GenerationStats) -> CloudFallbackUsage | None:
    lost = stats.cloud_lost
    return None if lost is None else CloudFallbackUsage(at_token=lost.at_token, error=lost.error)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _speculative_usage(stats: GenerationStats) -> SpeculativeUsage | None:
    # A fallback before any verification answered is still reported: the answer is the
    # edge model's, and the client must be able to tell.
    if not stats.verify_rounds and not stats.fell_back:
        return None
    return SpeculativeUsage(
        drafted=stats.drafted,
        accepted=stats.accepted,
        verify_rounds=stats.verify_rounds,
        acceptance_rate=round(stats.accepted / max(1, stats.drafted), 4),
        tokens_per_verify=round(stats.completion_tokens / max(1, stats.verify_rounds), 3),
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


def chat_logprobs(
    entries: Sequence[tuple[int, TokenLogprob]], token_bytes: Callable[[int], bytes]
) -> list[ChatTokenLogprob]:
    """OpenAI's ``logprobs.content`` entries of (token id, its logprobs) pairs."""

    def alternative(token: int, logprob: float) -> TopLogprob:
        raw = token_bytes(token)
        return TopLogprob(token=raw.decode("utf-8", "replace"), logprob=logprob, bytes=list(raw))

    out = []
    for token, lp in entries:
        raw = token_bytes(token)
        out.append(
            ChatTokenLogprob(
                token=raw.decode("utf-8", "replace"),
                logprob=lp.logprob,
                bytes=list(raw),
                top_logprobs=[
                    alternative(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
                ],
            )
        )
    return out


def completion_logprobs(
    entries: Sequence[tuple[int, TokenLogprob]], token_bytes: Callable[[int], bytes], offset: int
) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` object; ``offset``: characters before these."""
    out = CompletionLogprobs()
    for entry in chat_logprobs(entries, token_bytes):
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({alt.token: alt.logprob for alt in entry.top_logprobs})
        out.text_offset.append(offset)
        offset += len(entry.token)
    return out


def _logprob_entries(event: TokenEvent) -> list[tuple[int, TokenLogprob]]:
    return list(zip(event.token_ids, event.logprobs or [], strict=False))


@dataclass
class _Drained:
    text: str
    finish: FinishEvent
    logprobs: list[tuple[int, TokenLogprob]]


async def _drain(events: Events, ctx: AnswerContext) -> _Drained:
    """Collect all text (and logprobs) of a generation.

    Every consumer runs the event stream to its end (it ends right after the
    finish event), so the generator's clean-up (freeing a slot, unsubscribing)
    runs now, not whenever the garbage collector finalizes it.
    """
    parts: list[str] = []
    logprobs: list[tuple[int, TokenLogprob]] = []
    finish: FinishEvent | None = None
    async for event in events:
        parts.append(event.text)
        if isinstance(event, FinishEvent):
            ctx.on_finish(event.stats)
            finish = event
        else:
            ctx.on_token(event)
            if event.logprobs:
                logprobs.extend(_logprob_entries(event))
    if finish is None:
        raise EngineError("the generation ended without a finish event")
    return _Drained("".join(parts), finish, logprobs)


async def collect_chat(events: Events, ctx: AnswerContext) -> ChatCompletion:
    """A whole ``chat.completion`` body."""
    drained = await _drain(events, ctx)
    stats = drained.finish.stats
    parsed = ctx.parse_tools(drained.text, drained.finish)
    message = ChatMessageOut(content=parsed.content, tool_calls=_tool_calls(parsed))
    logprobs = None
    if ctx.token_bytes is not None:
        logprobs = ChoiceLogprobs(content=chat_logprobs(drained.logprobs, ctx.token_bytes))
    choice = ChatChoice(
        index=ctx.index,
        message=message,
        finish_reason=_finish_reason(stats, parsed),
        logprobs=logprobs,
    )
    return ChatCompletion(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=[choice],
        usage=ctx.usage(stats),
        system_fingerprint=SIMULATED_FINGERPRINT if stats.simulated else None,
    )


async def collect_completion(events: Events, ctx: AnswerContext) -> Completion:
    """A whole ``text_completion`` body."""
    drained = await _drain(events, ctx)
    stats = drained.finish.stats
    logprobs = None
    if ctx.token_bytes is not None:
        logprobs = completion_logprobs(drained.logprobs, ctx.token_bytes, 0)
    choice = CompletionChoice(
        index=ctx.index,
        text=drained.text,
        finish_reason=stats.finish_reason or "stop",
        logprobs=logprobs,
    )
    return Completion(
        id=ctx.id, created=ctx.created, model=ctx.model, choices=[choice], usage=ctx.usage(stats)
    )


def merged_usage(contexts: Sequence[AnswerContext]) -> Usage:
    """The usage of an ``n``-choice answer, as OpenAI counts it: the prompt once, the
    completion tokens of every choice; Tandem's route facts are the first choice's."""
    first = contexts[0]
    assert first.stats is not None, "merged_usage needs finished choices"
    usage = first.usage(first.stats)
    completion = sum(c.stats.completion_tokens for c in contexts if c.stats is not None)
    return usage.model_copy(
        update={"completion_tokens": completion, "total_tokens": usage.prompt_tokens + completion}
    )


def merge_choices(answers: Sequence[A], contexts: Sequence[AnswerContext]) -> A:
    """One answer (``chat.completion`` or ``text_completion``) of ``n`` choices, each
    answered with its own context."""
    choices = [choice for answer in answers for choice in answer.choices]
    return answers[0].model_copy(update={"choices": choices, "usage": merged_usage(contexts)})


def sse(payload: dict[str, object] | str) -> bytes:
    """One server-sent event line."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


# Stands for the delta in the one chunk rendered in full to get a stream's frame.
_DELTA_MARK = "tandem-delta-mark-7f3c"
_MARKED_DELTA = sse({"content": _DELTA_MARK})[len(b"data: ") : -len(b"\n\n")]


class _ChatChunks:
    """Builds ``chat.completion.chunk`` events of one choice in OpenAI's exact shape."""

    def __init__(self, ctx: AnswerContext) -> None:
        self.ctx = ctx
        self._frame: tuple[bytes, bytes] | None = None

    def content(self, text: str | None, logprobs: list[ChatTokenLogprob]) -> bytes:
        """A content chunk. Plain text (the common case, one per token or burst) skips
        the models: only its delta is encoded, inside the stream's fixed frame, which
        is the full path's own rendering of one chunk, so the bytes are the same."""
        if logprobs:
            return self.chunk(ChatDelta(content=text), logprobs=logprobs)
        if self._frame is None:
            self._frame = self._content_frame()
        head, tail = self._frame
        delta = {} if text is None else {"content": text}
        return head + json.dumps(delta, ensure_ascii=False, separators=(",", ":")).encode() + tail

    def _content_frame(self) -> tuple[bytes, bytes]:
        whole = self.chunk(ChatDelta(content=_DELTA_MARK))
        head, mark, tail = whole.partition(_MARKED_DELTA)
        assert mark and _MARKED_DELTA not in tail, "the delta appears once in a chunk"
        return head, tail

    def chunk(
        self,
        delta: ChatDelta,
        finish_reason: str | None = None,
        logprobs: list[ChatTokenLogprob] | None = None,
    ) -> bytes:
        ctx = self.ctx
        choice = ChatChunkChoice(index=ctx.index, delta=delta, finish_reason=finish_reason)
        if logprobs:
            choice.logprobs = ChoiceLogprobs(content=logprobs)
        body = ChatCompletionChunk(
            id=ctx.id, created=ctx.created, model=ctx.model, choices=[choice]
        ).model_dump(exclude={"usage"} if not ctx.include_usage else set())
        # OpenAI omits unset delta fields rather than sending nulls.
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return sse(body)


def chat_usage_chunk(ctx: AnswerContext, usage: Usage) -> bytes:
    """The last ``chat.completion.chunk`` of a stream that asked for usage."""
    simulated = ctx.stats is not None and ctx.stats.simulated
    body = ChatCompletionChunk(
        id=ctx.id,
        created=ctx.created,
        model=ctx.model,
        choices=[],
        usage=usage,
        system_fingerprint=SIMULATED_FINGERPRINT if simulated else None,
    )
    return sse(body.model_dump())


@dataclass(frozen=True)
class AnswerText:
    """Text of a streamed answer as it becomes safe to show (tool-call markup held back),
    with the logprobs of the tokens that came with it (text may lag its tokens, or be
    empty while markup is held)."""

    text: str
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class AnswerEnd:
    """The end of a streamed answer (after its last text): its tool calls, its OpenAI
    ``finish_reason`` and what it cost."""

    calls: list[ParsedToolCall]
    finish_reason: str
    stats: GenerationStats


AnswerPiece = AnswerText | AnswerEnd


async def chat_pieces(events: Events, ctx: AnswerContext) -> AsyncGenerator[AnswerPiece, None]:
    """One chat answer's text, then its end: the streaming loop chat chunks and
    Responses events share.

    Tool-call markup is held back and parsed at the end (malformed calls counted, the
    generator's own calls preferred); token timing and the finish go to ``ctx``, the
    finish before the end is yielded. The events run to their end (see ``_drain``)."""
    tools = ToolCallStream(ctx.tool_names) if ctx.tool_names is not None else None
    finished = False
    try:
        async for event in events:
            text = tools.push(event.text) if tools else event.text
            if isinstance(event, FinishEvent):
                if text:
                    yield AnswerText(text)
                parsed = _parse_held(ctx, tools, event)
                if parsed.content:
                    yield AnswerText(parsed.content)
                ctx.on_finish(event.stats)
                finished = True
                yield AnswerEnd(parsed.calls, _finish_reason(event.stats, parsed), event.stats)
                continue
            ctx.on_token(event)
            logprobs = _event_logprobs(event, ctx.token_bytes)
            if text or logprobs:
                yield AnswerText(text, logprobs)
    finally:
        # Closed early (a client went away): stop the generation now, not at its collection.
        if isinstance(events, AsyncGenerator):
            await events.aclose()
    if not finished:
        raise EngineError("the generation ended without a finish event")


def _event_logprobs(
    event: TokenEvent, token_bytes: Callable[[int], bytes] | None
) -> list[ChatTokenLogprob]:
    if not event.logprobs or token_bytes is None:
        return []
    return chat_logprobs(_logprob_entries(event), token_bytes)


def _parse_held(
    ctx: AnswerContext, tools: ToolCallStream | None, finish: FinishEvent
) -> ToolCallParse:
    """The held-back text, parsed: its ``content`` is the text not streamed yet."""
    if tools is None:
        return ToolCallParse(content=None)
    parsed = tools.finish()
    ctx.metrics.malformed_tool_calls.inc(len(parsed.malformed))
    return with_generator_calls(parsed, finish)


async def chat_chunks(events: Events, ctx: AnswerContext) -> AsyncIterator[bytes]:
    """One choice's chunks: its role, content (with logprobs), tool calls and finish
    reason; the stream's usage chunk and ``[DONE]`` come from ``stream_choices``."""
    chunks = _ChatChunks(ctx)
    try:
        yield chunks.chunk(ChatDelta(role="assistant", content=""))
        async with aclosing(chat_pieces(events, ctx)) as pieces:
            async for piece in pieces:
                if isinstance(piece, AnswerText):
                    yield chunks.content(piece.text or None, piece.logprobs)
                    continue
                for i, call in enumerate(piece.calls):
                    function = FunctionCall(name=call.name, arguments=call.arguments)
                    delta = ToolCallDelta(index=i, id=call.id, function=function)
                    yield chunks.chunk(ChatDelta(tool_calls=[delta]))
                yield chunks.chunk(ChatDelta(), finish_reason=piece.finish_reason)
    except EdgeError as exc:
        # Headers are gone already; the error travels as an event, like vLLM does.
        ctx.on_error(exc)
        yield sse(exc.body())


async def stream_choices(
    streams: Sequence[AsyncIterator[bytes]],
    contexts: Sequence[AnswerContext],
    usage_chunk: Callable[[AnswerContext, Usage], bytes],
) -> AsyncIterator[bytes]:
    """An SSE answer of ``n`` choices: their chunk streams (``chat_chunks`` or
    ``completion_chunks``) interleaved as they come, the usage chunk summed over them
    if asked for, and ``[DONE]``."""
    async for item in interleave(streams):
        yield item
    if contexts[0].include_usage and all(c.stats is not None for c in contexts):
        yield usage_chunk(contexts[0], merged_usage(contexts))
    yield sse("[DONE]")


async def interleave(streams: Sequence[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """The items of several streams as they come (the choices of ``n`` run together).

    Closing the result closes every stream (a client disconnect cancels all choices)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[bytes]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(None)
        except Exception as exc:  # surfaced to the consumer, never lost
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            got = await queue.get()
            if got is None:
                running -= 1
            elif isinstance(got, Exception):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _completion_chunk(
    ctx: AnswerContext,
    text: str,
    finish: str | None,
    usage: Usage | None = None,
    logprobs: CompletionLogprobs | None = None,
) -> bytes:
    choices = (
        [CompletionChoice(index=ctx.index, text=text, finish_reason=finish, logprobs=logprobs)]
        if usage is None
        else []
    )
    body = Completion(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage)
    return sse(body.model_dump(exclude={"usage"} if not ctx.include_usage else set()))


def completion_usage_chunk(ctx: AnswerContext, usage: Usage) -> bytes:
    """The last ``text_completion`` chunk of a stream that asked for usage."""
    return _completion_chunk(ctx, "", None, usage)


async def completion_chunks(events: Events, ctx: AnswerContext) -> AsyncIterator[bytes]:
    """One choice's ``text_completion`` chunks (usage and ``[DONE]``: ``stream_choices``)."""
    offset = 0
    try:
        async for event in events:
            if isinstance(event, FinishEvent):
                yield _completion_chunk(ctx, event.text, event.stats.finish_reason or "stop")
                ctx.on_finish(event.stats)
                continue
            ctx.on_token(event)
            logprobs = None
            if event.logprobs and ctx.token_bytes is not None:
                logprobs = completion_logprobs(_logprob_entries(event), ctx.token_bytes, offset)
            if event.text or logprobs:
                yield _completion_chunk(ctx, event.text, None, logprobs=logprobs)
            offset += len(event.text)
    except EdgeError as exc:
        ctx.on_error(exc)
        yield sse(exc.body())
