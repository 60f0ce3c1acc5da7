"""The edge's serving layer: one function per route, each returning the route it took.

A chat request arrives here with its ``RoutePlan`` (``edge.route_plan``), which
fixed everything the policy says about it. ``serve_chat`` runs the plan:

- **edge**: llama.cpp answers (``serve_edge``); when the plan allows escalation a
  ``ConfidenceWatch`` rides along, and an answer that stops unsure continues on the
  plan's escalation route from the tokens already sent (``_escalating``);
- **cloud**: a cloud worker answers over NATS (``serve_cloud``);
- **speculative**: llama.cpp drafts, a cloud worker verifies (``serve_speculative``,
  the decode loop is ``edge.drafter.SpeculativeDecoder``).

A route that needs the cloud and finds none serves on the edge (route
``edge-fallback``) or fails with 503, as the plan's ``cloud_unavailable`` says.
Each function returns ``Served``: the answer's events and the route it actually
took, as a value; nothing here reads the live policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from edge.cloud_route import CloudRoute, deadline_in
from edge.drafter import SpeculativeDecoder
from edge.errors import CloudUnavailableError
from edge.escalation import ConfidenceWatch
from edge.generation import (
    CloudLost,
    Event,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    Handover,
    TokenEvent,
)
from edge.openai_protocol import ChatCompletionRequest
from edge.route_plan import RoutePlan
from edge.state import EdgeState
from mesh.protocol import RenderedPrompt
from mesh.protocol import SamplingParams as WireSampling

logger = logging.getLogger(__name__)

# Awaits some work, cancelling it if the client disconnects meanwhile (the HTTP layer's).
Guard = Callable[[Awaitable[Any]], Awaitable[Any]]

_NO_CLOUD = (
    "no cloud worker is reachable for this request; retry later or ask for the edge "
    "(model '<name>@edge' or header 'x-tandem-route: edge')"
)


@dataclass(frozen=True)
class Call:
    """What the routes need of the HTTP request: its session and its disconnect guard."""

    session_id: str | None
    guard: Guard


@dataclass(frozen=True)
class Served:
    """An answer's events and the route it actually took."""

    events: AsyncGenerator[Event, None]
    route: str  # edge | cloud | speculative | edge-fallback


async def serve_chat(
    state: EdgeState,
    call: Call,
    plan: RoutePlan,
    body: ChatCompletionRequest,
    prompt: RenderedPrompt,
) -> Served:
    """Serve a chat request on its planned route (or the plan's fallback)."""
    generation = GenerationRequest(
        prompt_tokens=prompt.token_ids,
        sampling=body.to_sampling_params(
            default_max_tokens=state.prompts.completion_budget(
                len(prompt.token_ids), body.requested_max_tokens()
            )
        ),
        session_id=call.session_id,
        prompt_sha256=prompt.text_sha256,
    )
    if plan.route == "cloud":
        served = await serve_cloud(state, call, plan, body, edge_rest=generation, prompt=prompt)
        if served is not None:
            return served
    if plan.route == "speculative":
        return await serve_speculative(state, call, plan, generation)
    if plan.route == "cloud":
        return await serve_edge(state, call, generation, "edge-fallback")
    if plan.escalation is None:
        return await serve_edge(state, call, generation)
    return await _serve_escalating(state, call, plan, body, generation)


async def serve_edge(
    state: EdgeState, call: Call, generation: GenerationRequest, route: str = "edge"
) -> Served:
    """llama.cpp answers on this edge."""
    return Served(await prime(call, state.engine.generate(generation)), route)


async def serve_cloud(
    state: EdgeState,
    call: Call,
    plan: RoutePlan,
    body: ChatCompletionRequest,
    resume_token_ids: list[int] | None = None,
    edge_rest: GenerationRequest | None = None,
    prompt: RenderedPrompt | None = None,
) -> Served | None:
    """A cloud worker answers; None when no cloud is there and the plan says to use the edge.

    ``resume_token_ids``: an escalated edge answer's tokens so far; the worker
    continues after them. ``edge_rest``: the same request for the edge model; when every
    worker goes away mid-answer (a partition: failover found no one) and the plan says
    ``cloud_unavailable: edge``, the edge finishes the answer after the cloud's tokens.
    ``prompt``: the edge's rendering of the chat, which the worker may reuse."""
    cloud = _reachable_cloud(state)
    try:
        if cloud is None:
            raise CloudUnavailableError(_NO_CLOUD)
        events = cloud.generate(
            messages=[m.to_template_dict() for m in body.messages],
            tools=body.active_tools(),
            tool_choice=_dump(body.tool_choice),
            sampling=WireSampling(
                max_tokens=body.requested_max_tokens(),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop_list() or None,
                constraint=body.output_constraint,
                logprobs=body.logprobs_k(),
            ),
            session_id=call.session_id,
            deadline=deadline_in(state.settings.cloud_timeout_s),
            resume_token_ids=resume_token_ids,
            streaming=body.stream,
            prompt=prompt,
        )
        if edge_rest is not None and plan.cloud_unavailable == "edge" and _resumable(body):
            events = _finishing_on_edge(state, call, edge_rest, events)
        return Served(await prime(call, events), "cloud")
    except CloudUnavailableError:
        if plan.cloud_unavailable == "fail":
            raise
        logger.info("cloud unavailable; serving on the edge")
        return None


async def serve_speculative(
    state: EdgeState, call: Call, plan: RoutePlan, generation: GenerationRequest
) -> Served:
    """llama.cpp drafts, a cloud worker verifies: the answer is the cloud model's."""
    cloud = _reachable_cloud(state)
    if cloud is None:
        if plan.cloud_unavailable == "fail":
            raise CloudUnavailableError("no cloud worker is reachable to verify drafts")
        return await serve_edge(state, call, generation, "edge-fallback")
    verifier = cloud.verifier(
        asyncio.get_running_loop(),
        sampling=generation.sampling,
        session_id=call.session_id,
        deadline=deadline_in(state.settings.cloud_timeout_s),
    )
    decoder = SpeculativeDecoder(
        verifier,
        max_draft_tokens=plan.max_draft_tokens or SpeculativeDecoder.max_draft_tokens,
        fallback_to_edge=plan.cloud_unavailable == "edge",
    )
    return await serve_edge(state, call, replace(generation, decoder=decoder), "speculative")


async def prime(call: Call, events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    """Wait for the first event (queueing, prefill) so errors still get an HTTP status."""
    try:
        first = await call.guard(anext(events))
    except BaseException:
        await events.aclose()
        raise

    async def replay() -> AsyncGenerator[Event, None]:
        async with aclosing(events):
            yield first
            if not isinstance(first, FinishEvent):
                async for event in events:
                    yield event

    return replay()


# -- mid-answer escalation ----------------------------------------------------------


async def _serve_escalating(
    state: EdgeState,
    call: Call,
    plan: RoutePlan,
    body: ChatCompletionRequest,
    generation: GenerationRequest,
) -> Served:
    """The edge answers, watched; if it grows unsure the plan's escalation route finishes."""
    assert plan.escalation is not None
    watch = ConfidenceWatch(
        plan.escalation.window_tokens,
        plan.escalation.min_mean_logprob,
        plan.escalation.after_tokens,
    )
    watched = replace(generation, confidence=watch)
    served = await serve_edge(state, call, watched)
    return Served(_escalating(state, call, plan, body, watched, served.events), "edge")


async def _escalating(
    state: EdgeState,
    call: Call,
    plan: RoutePlan,
    body: ChatCompletionRequest,
    generation: GenerationRequest,
    events: AsyncGenerator[Event, None],
) -> AsyncGenerator[Event, None]:
    """The edge's events; after an unsure stop, the rest of the same answer from the
    plan's escalation route, continuing after the tokens already sent. The finish
    event's stats carry the ``Handover`` (usage.tandem.escalation)."""
    emitted: list[int] = []
    stopped: FinishEvent | None = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, FinishEvent) and event.stats.finish_reason == "escalate":
                stopped = event
                break
            if isinstance(event, TokenEvent):
                emitted.extend(event.token_ids)
            yield event
    # Closed: the edge slot is free again (the continuation may need it).
    if stopped is None:
        return
    if stopped.text:
        yield TokenEvent([], stopped.text)
    assert plan.escalation is not None and generation.confidence is not None
    rest = await _continuation(state, call, plan, body, generation, emitted)
    handover = Handover(
        at_token=len(emitted),
        mean_logprob=round(generation.confidence.triggered_mean or 0.0, 4),
        to=rest.route,
    )
    state.metrics.escalations.labels(handover.to).inc()
    new_tokens = 0
    async for more in rest.events:
        if isinstance(more, TokenEvent):
            new_tokens += len(more.token_ids)
        else:
            more.stats.prompt_tokens = stopped.stats.prompt_tokens
            more.stats.cached_tokens = stopped.stats.cached_tokens
            more.stats.completion_tokens = len(emitted) + new_tokens
            more.stats.handover = handover
        yield more


async def _continuation(
    state: EdgeState,
    call: Call,
    plan: RoutePlan,
    body: ChatCompletionRequest,
    generation: GenerationRequest,
    emitted: list[int],
) -> Served:
    """The rest of an escalated answer on the plan's escalation route; the edge finishes
    it itself if the cloud is not there (per the plan's cloud_unavailable)."""
    assert plan.escalation is not None
    target = plan.escalation.route
    if target == "cloud":
        served = await serve_cloud(
            state, call, plan, body, resume_token_ids=emitted, prompt=_rendered(generation)
        )
        if served is not None:
            return served
    rest = GenerationRequest(
        prompt_tokens=generation.prompt_tokens + emitted,
        sampling=replace(
            generation.sampling, max_tokens=generation.sampling.max_tokens - len(emitted)
        ),
        session_id=generation.session_id,
    )
    if target == "speculative":
        return await serve_speculative(state, call, plan, rest)
    return await serve_edge(state, call, rest, "edge-fallback")


def _resumable(body: ChatCompletionRequest) -> bool:
    """Whether the edge can pick up a cloud answer midway. Not with tools or an output
    constraint: the cloud parses tool calls and holds the grammar's state, and the edge
    would restart both at the first token; those answers fail clearly instead."""
    return not body.active_tools() and body.output_constraint is None


async def _finishing_on_edge(
    state: EdgeState, call: Call, rest: GenerationRequest, events: AsyncGenerator[Event, None]
) -> AsyncGenerator[Event, None]:
    """The cloud's events; if the cloud goes away midway, the edge model's continuation
    after the tokens already sent. The finish event's stats carry ``CloudLost``
    (usage.tandem.fallback)."""
    emitted: list[int] = []
    started = False
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TokenEvent):
                    emitted.extend(event.token_ids)
                started = True
                yield event
        return
    except CloudUnavailableError as exc:
        if not started:  # nothing sent yet: the whole answer is the plan's fallback
            raise
        lost = CloudLost(at_token=len(emitted), error=str(exc))
    logger.warning("cloud lost after %d tokens (%s); the edge finishes", len(emitted), lost.error)
    state.metrics.cloud_fallbacks.inc()
    left = rest.sampling.max_tokens - len(emitted)
    if left <= 0:  # the cloud had produced everything but its finish
        yield FinishEvent("", GenerationStats(completion_tokens=len(emitted),
                                              finish_reason="length", cloud_lost=lost))  # fmt: skip
        return
    continued = GenerationRequest(
        prompt_tokens=rest.prompt_tokens + emitted,
        sampling=replace(rest.sampling, max_tokens=left),
        session_id=rest.session_id,
    )
    served = await serve_edge(state, call, continued, "edge-fallback")
    new_tokens = 0
    async for more in served.events:
        if isinstance(more, TokenEvent):
            new_tokens += len(more.token_ids)
        else:
            more.stats.prompt_tokens = len(rest.prompt_tokens)
            more.stats.completion_tokens = len(emitted) + new_tokens
            more.stats.cloud_lost = lost
        yield more


def _reachable_cloud(state: EdgeState) -> CloudRoute | None:
    cloud = state.cloud
    return cloud if cloud is not None and cloud.available() else None


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _rendered(generation: GenerationRequest) -> RenderedPrompt | None:
    """The prompt a cloud worker may reuse: the chat's ids and the digest of their text.

    Both fields came from a validated ``RenderedPrompt`` (``serve_chat``), so it is put
    back together without validating a prompt-long id list again on the hot path.
    """
    if generation.prompt_sha256 is None:
        return None
    return RenderedPrompt.model_construct(
        token_ids=generation.prompt_tokens, text_sha256=generation.prompt_sha256
    )
