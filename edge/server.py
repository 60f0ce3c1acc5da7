"""The edge daemon's HTTP app: the OpenAI API, health and metrics.

This module is the HTTP boundary only: the app factory, body parsing, auth,
error handlers and thin handlers. A chat request is planned once
(``edge.route_plan``), served on its route (``edge.serving``) and turned into an
OpenAI answer (``edge.answers``); the daemon's state is built in ``edge.state``.

Example::

    tandem edge serve --port 8080
    curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge import answers, responses, serving
from edge.answers import AnswerContext
from edge.api_keys import Principal
from edge.errors import (
    ClientClosedRequest,
    EdgeError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from edge.generation import Events, GenerationRequest, GenerationStats
from edge.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)
from edge.openapi import install_openapi
from edge.registration import MeshRegistration
from edge.responses_protocol import ResponseDeleted, ResponsesRequest
from edge.route_plan import RoutePlan, check_model, plan_chat
from edge.routing import ROUTE_HEADER, RULE_HEADER
from edge.serving import Call, Served
from edge.settings import EdgeSettings
from edge.state import EdgeState, build_state
from mesh.protocol import RenderedPrompt
from mesh.runtime import freeze_startup_objects

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
SESSION_HEADER = "x-session-id"


def create_app(settings: EdgeSettings) -> FastAPI:
    """The FastAPI app of one edge daemon; the model loads at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(build_state, settings)
        app.state.edge = state
        if state.key_file:
            await state.key_file.start()
        if settings.nats_url:
            keys = state.auth.ring if settings.mesh_api_keys else None
            state.registration = MeshRegistration(settings, state.engine, state.live, keys)
            await state.registration.start()
        logger.info("edge %s serving %s", settings.node_id, state.model_id)
        freeze_startup_objects()
        yield
        if state.registration:
            await state.registration.stop()
        if state.key_file:
            await state.key_file.stop()
        await state.engine.close()

    app = FastAPI(title="Tandem edge", lifespan=lifespan)
    _install_error_handlers(app)
    _install_routes(app)
    install_openapi(app)
    if settings.api_keys_file is not None or settings.mesh_api_keys:
        app.add_middleware(RateLimitHeaders)
    if settings.engine == "sim":
        from edge.sim_engine import SimulatedEngineHeader

        app.add_middleware(SimulatedEngineHeader)
    return app


def _state(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


# -- errors --------------------------------------------------------------------


def error_response(exc: EdgeError) -> JSONResponse:
    """The OpenAI-style JSON answer for an edge error."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeError)
    async def _edge_error(request: Request, exc: EdgeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = EdgeError(str(exc.detail))
        err.status, err.type = exc.status_code, "invalid_request_error"
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(EdgeError("internal error; the daemon logged the details"))


# -- request parsing -------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


# pydantic names the union member in an error's location ("NamedToolChoice",
# "literal['none','auto','required']", "list[str]"): not a field a person wrote.
_UNION_MEMBER = re.compile(r"^(?:[A-Z]\w*|str|int|float|bool|.*\[.*\])$")


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The one problem to report, as ``field.path: message`` (and the field path). Of a
    union's failed members, the one that got deepest into the value is the one its
    sender meant (a ``tool_choice`` object without a name: not "should be 'auto'")."""

    def path(error: Any) -> list[str]:
        return [str(p) for p in error["loc"] if not _UNION_MEMBER.match(str(p))]

    errors = exc.errors()
    first = max(errors, key=lambda e: len(path(e)))  # max keeps the first of equals
    loc = ".".join(path(first))
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix says nothing
    cause = first.get("ctx", {}).get("error")
    if not loc and isinstance(cause, FieldError):  # a check across fields names its field
        return msg, cause.param
    return f"{loc}: {msg}" if loc else msg, loc or None


async def parse_body(request: Request, model: type[T]) -> T:
    """Read, size-check, JSON-decode and validate a request body."""
    raw = await _read_body(request, _state(request).settings.max_body_bytes)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise InvalidRequestError(message, param=param) from exc


_RATE_HEADERS = "tandem_ratelimit_headers"  # request.state: the key's x-ratelimit-* headers


def _authorize(request: Request) -> Principal:
    """Who the request is (its API key), counted against the key's rate limits."""
    state = _state(request)
    principal = state.auth.principal(request.headers.get("authorization"))
    if principal.key is not None:
        headers = state.limiter.admit(principal.key)
        if headers:
            request.scope.setdefault("state", {})[_RATE_HEADERS] = headers
    return principal


class RateLimitHeaders:
    """Adds the request's ``x-ratelimit-*`` headers to its answer, streamed or not (plain
    ASGI: a BaseHTTPMiddleware would buffer streams and hide client disconnects)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(_RATE_HEADERS)
                if extra:
                    message["headers"] = [
                        *message.get("headers", []),
                        *((k.encode(), v.encode()) for k, v in extra.items()),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- generation plumbing ------------------------------------------------------------


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client goes away meanwhile.

    The body is already read, so the next ASGI message can only be the disconnect:
    one task waits for it. (Polling ``request.is_disconnected()`` cost 13 % of the
    edge's CPU in the scale run.)"""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled: take the work down too
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientClosedRequest("the client disconnected; its generation was cancelled")
    return task.result()


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the request body must be consumed already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _call(request: Request) -> Call:
    return Call(
        session_id=request.headers.get(SESSION_HEADER),
        guard=functools.partial(_unless_disconnected, request),
    )


def _observer(
    state: EdgeState, plan: RoutePlan
) -> Callable[[AnswerContext, GenerationStats], None]:
    """What the router learns when the answer is done, and what the key is charged."""

    def done(ctx: AnswerContext, stats: GenerationStats) -> None:
        route = stats.handover.to if stats.handover else ctx.route
        if stats.cloud_lost is not None:
            route = "edge-fallback"
        state.observations.record(
            route=route, tenant=plan.tenant, category=plan.category, stats=stats,
            ttft_s=ctx.ttft_s, elapsed_s=time.perf_counter() - ctx.started,
        )  # fmt: skip
        tokens = stats.prompt_tokens + stats.completion_tokens
        state.limiter.charge(plan.principal.key, tokens)
        fleet = state.fleet_usage
        if fleet is not None and route in ("cloud", "speculative"):
            fleet.add(plan.tenant, tokens)

    return done


def _charge(
    state: EdgeState, principal: Principal
) -> Callable[[AnswerContext, GenerationStats], None]:
    """Charge a finished edge-only answer (text completions) to the key's tokens."""

    def done(ctx: AnswerContext, stats: GenerationStats) -> None:
        state.limiter.charge(principal.key, stats.prompt_tokens + stats.completion_tokens)

    return done


def _route_headers(ctx: AnswerContext) -> dict[str, str]:
    """Where the answer runs and the policy rule that sent it there."""
    return {ROUTE_HEADER: ctx.route, RULE_HEADER: ctx.rule or ""}


def _streaming(body_iter: AsyncIterator[bytes], ctx: AnswerContext) -> StreamingResponse:
    return StreamingResponse(
        body_iter,
        media_type="text/event-stream",
        headers={**_route_headers(ctx), "cache-control": "no-cache"},
    )


# -- routes -----------------------------------------------------------------------


def _install_routes(app: FastAPI) -> None:
    app.add_api_route("/health", handle_health, methods=["GET"])
    app.add_api_route("/metrics", handle_metrics, methods=["GET"])
    app.add_api_route("/v1/models", handle_list_models, methods=["GET"])
    for path, handler in (
        ("/v1/chat/completions", handle_chat_completion),
        ("/v1/completions", handle_completion),
        ("/v1/responses", handle_create_response),
    ):
        app.add_api_route(path, handler, methods=["POST"], response_model=None)
    app.add_api_route("/v1/responses/{response_id}", handle_get_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", handle_delete_response, methods=["DELETE"])


async def handle_health(request: Request) -> dict[str, Any]:
    """Liveness and what this edge is doing (no auth: probes call it)."""
    state = _state(request)
    reg = state.registration
    return {
        "status": "ok",
        "node_id": state.settings.node_id,
        "model": state.model_id,
        "running": state.engine.running,
        "waiting": state.engine.waiting,
        "mesh": None if reg is None else ("connected" if reg.connected else "disconnected"),
        "policy": state.live.status(),
        "classifier": state.classifier is not None,
        "api_keys": state.auth.status(),
    }


async def handle_metrics(request: Request) -> Response:
    """Prometheus metrics."""
    _authorize(request)
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def handle_list_models(request: Request) -> ModelList:
    """OpenAI's model list: the model this edge serves."""
    _authorize(request)
    state = _state(request)
    card = ModelCard(id=state.model_id, created=state.created, max_model_len=state.engine.n_ctx)
    return ModelList(data=[card])


async def plan_request(
    request: Request, state: EdgeState, body: ChatCompletionRequest, principal: Principal
) -> tuple[RoutePlan, RenderedPrompt]:
    """Check the model, render the prompt and plan the route: the one read of the live
    policy. Chat and the Responses API both go through here."""
    snapshot = state.policy_snapshot()
    check_model(snapshot, state.model_id, body.model)
    prompt = await asyncio.to_thread(state.prompts.chat_prompt, body)
    plan = plan_chat(
        snapshot, body, prompt.token_ids, request.headers, load=state.load(),
        observations=state.observations, classifier=state.classifier, metrics=state.metrics,
        principal=principal, fleet=state.fleet_usage,
    )  # fmt: skip
    return plan, prompt


def chat_context(
    state: EdgeState, body: ChatCompletionRequest, plan: RoutePlan, route: str, **fields: Any
) -> AnswerContext:
    """The answer context of a chat request served on ``route`` (``fields``: e.g. the
    choice ``index`` and the shared ``id`` of an ``n``-choice answer)."""
    tools = body.active_tools()
    return AnswerContext(
        model=body.model,
        node_id=state.settings.node_id,
        metrics=state.metrics,
        endpoint="chat",
        route=route,
        rule=plan.rule,
        include_usage=body.include_usage(),
        tool_names={t["function"]["name"] for t in tools} if tools else None,
        token_bytes=state.engine.token_bytes if body.logprobs_k() is not None else None,
        on_done=_observer(state, plan),
        **fields,
    )


def _check_n(state: EdgeState, n: int) -> None:
    if n > state.settings.max_n:
        raise InvalidRequestError(
            f"n is {n}; this edge generates at most {state.settings.max_n} choices per request",
            param="n",
        )


@dataclass(frozen=True)
class _AnswerKind:
    """How an endpoint's choices become an answer: chat or text completion."""

    chunks: Callable[[Events, AnswerContext], AsyncIterator[bytes]]
    usage_chunk: Callable[[AnswerContext, Usage], bytes]
    collect: Callable[[Events, AnswerContext], Awaitable[Any]]


_CHAT = _AnswerKind(answers.chat_chunks, answers.chat_usage_chunk, answers.collect_chat)
_COMPLETION = _AnswerKind(
    answers.completion_chunks, answers.completion_usage_chunk, answers.collect_completion
)


async def _plain(work: Awaitable[Any]) -> Any:
    return await work


async def _respond(
    request: Request,
    kind: _AnswerKind,
    stream: bool,
    first: Served,
    contexts: list[AnswerContext],
    serve_choice: Callable[[int, Call], Awaitable[Served]],
) -> Response:
    """The answer of ``len(contexts)`` choices: the first already served (so its errors
    got an HTTP status), the others served now, all running together."""
    head, head_call = contexts[0], _call(request)

    async def events_of(i: int) -> Events:
        if i == 0:
            return first.events
        # Only the first choice watches for a disconnect; closing the answer stops all.
        served = await serve_choice(i, Call(head_call.session_id, _plain))
        contexts[i].route = served.route
        return served.events

    async def later_chunks(i: int) -> AsyncIterator[bytes]:
        try:
            events = await events_of(i)
        except EdgeError as exc:
            yield answers.sse(exc.body())
            return
        async for item in kind.chunks(events, contexts[i]):
            yield item

    if stream:
        streams = [kind.chunks(first.events, head), *map(later_chunks, range(1, len(contexts)))]
        return _streaming(answers.stream_choices(streams, contexts, kind.usage_chunk), head)

    async def collect(i: int) -> Any:
        return await kind.collect(await events_of(i), contexts[i])

    tasks = [asyncio.ensure_future(collect(i)) for i in range(len(contexts))]
    try:
        done = await _unless_disconnected(request, asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    answer = done[0] if len(done) == 1 else answers.merge_choices(done, contexts)
    return JSONResponse(answer.model_dump(), headers=_route_headers(head))


async def handle_chat_completion(request: Request) -> Response:
    """``POST /v1/chat/completions``: plan once, serve each choice on the route, answer."""
    principal = _authorize(request)
    state = _state(request)
    body = await parse_body(request, ChatCompletionRequest)
    _check_n(state, body.n)
    plan, prompt = await plan_request(request, state, body, principal)
    # Choice i samples with its own seed (``choice_seed``); the plan is the same for all.
    bodies = [body] + [
        body.model_copy(update={"seed": body.choice_seed(i)}) for i in range(1, body.n)
    ]

    def serve_choice(i: int, call: Call) -> Awaitable[Served]:
        return serving.serve_chat(state, call, plan, bodies[i], prompt)

    first = await serve_choice(0, _call(request))
    head = chat_context(state, body, plan, first.route)
    contexts = [head] + [
        chat_context(state, bodies[i], plan, first.route, index=i, id=head.id)
        for i in range(1, body.n)
    ]
    return await _respond(request, _CHAT, body.stream, first, contexts, serve_choice)


async def handle_completion(request: Request) -> Response:
    """``POST /v1/completions``: raw text completion, served on the edge only."""
    principal = _authorize(request)
    state = _state(request)
    body = await parse_body(request, CompletionRequest)
    _check_n(state, body.n)
    check_model(state.policy_snapshot(), state.model_id, body.model)
    prompt = await asyncio.to_thread(state.prompts.completion_tokens, body)
    max_tokens = state.prompts.completion_budget(len(prompt), body.max_tokens)
    sampling = body.to_sampling_params(default_max_tokens=max_tokens)
    completion_id = new_id("cmpl")
    contexts = [
        AnswerContext(
            model=state.model_id,
            node_id=state.settings.node_id,
            metrics=state.metrics,
            endpoint="completions",
            include_usage=body.include_usage(),
            token_bytes=state.engine.token_bytes if body.logprobs_k() is not None else None,
            index=i,
            id=completion_id,
            rule="text-completions",  # the policy routes chat; text completions stay here
            on_done=_charge(state, principal),
        )
        for i in range(body.n)
    ]

    def serve_choice(i: int, call: Call) -> Awaitable[Served]:
        generation = GenerationRequest(
            prompt_tokens=prompt,
            sampling=replace(sampling, seed=body.choice_seed(i)),
            session_id=call.session_id,
        )
        return serving.serve_edge(state, call, generation)

    first = await serve_choice(0, _call(request))
    return await _respond(request, _COMPLETION, body.stream, first, contexts, serve_choice)


async def handle_create_response(request: Request) -> Response:
    """``POST /v1/responses``: served as a chat, on chat's route plan and routes."""
    principal = _authorize(request)
    state = _state(request)
    body = await parse_body(request, ResponsesRequest)
    turn = responses.Turn(body, state.responses.history(body.previous_response_id))
    chat = body.to_chat(turn.history)
    plan, prompt = await plan_request(request, state, chat, principal)
    served = await serving.serve_chat(state, _call(request), plan, chat, prompt)
    ctx = replace(chat_context(state, chat, plan, served.route), endpoint="responses", id=turn.id)
    if body.stream:
        return _streaming(responses.stream_response(served.events, ctx, turn, state.responses), ctx)
    answer = await _unless_disconnected(request, answers.collect_chat(served.events, ctx))
    response = state.responses.remember(turn, responses.from_chat(turn, answer))
    return JSONResponse(response.dump(), headers=_route_headers(ctx))


async def handle_get_response(request: Request, response_id: str) -> JSONResponse:
    """``GET /v1/responses/{id}``: a stored response (404 when unknown or evicted)."""
    _authorize(request)
    return JSONResponse(_state(request).responses.get(response_id).response.dump())


async def handle_delete_response(request: Request, response_id: str) -> JSONResponse:
    """``DELETE /v1/responses/{id}``: forget a stored response."""
    _authorize(request)
    _state(request).responses.delete(response_id)
    return JSONResponse(ResponseDeleted(id=response_id).model_dump())


def serve(settings: EdgeSettings) -> None:
    """Run the edge daemon until interrupted (HTTPS when a certificate is set)."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
