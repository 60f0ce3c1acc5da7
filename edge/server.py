"""The edge daemon's HTTP app: the OpenAI API, health and metrics over the llama.cpp engine.

Example::

    tandem edge serve --port 8080
    curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge import answers
from edge.answers import AnswerContext
from edge.cloud_route import CloudUnavailableError, deadline_in
from edge.drafter import Verifier
from edge.engine import (
    EdgeEngine,
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    LlamaEngine,
    TokenEvent,
)
from edge.errors import (
    AuthenticationError,
    ClientClosedRequest,
    CloudBudgetExceededError,
    EdgeError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
)
from edge.escalation import ConfidenceWatch
from edge.metrics import EdgeMetrics
from edge.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EscalationUsage,
    ModelCard,
    ModelList,
    new_id,
    unix_now,
)
from edge.prompts import PromptBuilder
from edge.registration import MeshRegistration
from edge.routing import (
    DEFAULT_TENANT,
    ROUTE_HEADER,
    RULE_HEADER,
    TENANT_HEADER,
    ComplexityScorer,
    Observations,
    category,
    chat_features,
)
from edge.sampling import SamplingParams
from edge.settings import EdgeSettings
from mesh.protocol import SamplingParams as WireSampling
from models.catalog import Catalog
from models.chat_template import load_template
from models.convert import edge_gguf_path
from router.live import LivePolicy
from router.policy import PolicyError, RouteDecision, RoutingPolicy, base_model, decide
from tandem.runtime import freeze_startup_objects

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
SESSION_HEADER = "x-session-id"


@dataclass
class EdgeState:
    """Everything a request handler needs; owned by the app, no module globals."""

    settings: EdgeSettings
    engine: EdgeEngine
    prompts: PromptBuilder
    metrics: EdgeMetrics
    model_id: str
    created: int
    live: LivePolicy  # the routing policy in force; swapped whole on a new revision
    observations: Observations
    classifier: ComplexityScorer | None = None  # loaded when a policy needs it
    registration: MeshRegistration | None = None

    @property
    def policy(self) -> RoutingPolicy:
        return self.live.current

    def cloud_workers(self) -> int | None:
        """Healthy cloud workers for this edge's model; None when not on a mesh."""
        fleet = self.registration.fleet if self.registration else None
        return None if fleet is None else len(fleet.healthy_workers(self.model_id))


def engine_config(settings: EdgeSettings) -> tuple[EngineConfig, str]:
    """The engine config for the settings' catalog pair, and the pair's chat template."""
    pair = Catalog.load().get(settings.model)
    config = EngineConfig(
        model_path=settings.gguf or edge_gguf_path(pair),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch or settings.n_threads,
        slots=settings.slots,
        max_queue=settings.max_queue,
        session_cache_bytes=settings.session_cache_mb * 1024 * 1024,
    )
    return config, load_template(pair.chat_template)


def load_policy(path: Path | None) -> LivePolicy:
    """The starting policy: a YAML file, or the built-in one (the store may replace it)."""
    if path is None:
        return LivePolicy(RoutingPolicy(), source="built-in")
    try:
        return LivePolicy(RoutingPolicy.from_yaml(path.read_text(encoding="utf-8")), "file")
    except (OSError, PolicyError) as exc:
        raise SystemExit(f"routing policy {path} is not usable:\n{exc}") from exc


def make_engine(settings: EdgeSettings, config: EngineConfig) -> EdgeEngine:
    """llama.cpp, or the simulated engine (latency model, no weights) for scale runs."""
    if settings.engine == "sim":
        from edge.sim_engine import SimEngine
        from models.latency import LatencyProfile

        return SimEngine(config, LatencyProfile.load(settings.sim_profile).edge)
    return LlamaEngine(config)


def build_state(settings: EdgeSettings) -> EdgeState:
    """Load the model and wire the engine, prompts and metrics together."""
    config, template = engine_config(settings)
    engine = make_engine(settings, config)
    metrics = EdgeMetrics()
    metrics.add_gauge(
        "tandem_edge_simulated_engine",
        "1 when this edge runs the SIMULATED engine (scale runs), else 0.",
        lambda: int(engine.simulated),
    )
    metrics.add_gauge(
        "tandem_edge_queue_depth", "Requests waiting for a slot.", lambda: engine.waiting
    )
    metrics.add_gauge(
        "tandem_edge_running_requests", "Requests generating now.", lambda: engine.running
    )
    metrics.add_gauge(
        "tandem_edge_session_cache_bytes",
        "Saved conversation KV bytes.",
        lambda: engine.session_cache_bytes,
    )
    metrics.add_counter(
        "tandem_edge_llama_prompt_eval_tokens",
        "llama.cpp's own count of prompt tokens evaluated (n_p_eval).",
        lambda: engine.perf_counters()["n_p_eval"],
    )
    metrics.add_counter(
        "tandem_edge_engine_generated_tokens",
        "Tokens llama.cpp generated, including for cancelled requests.",
        lambda: engine.generated_tokens,
    )
    metrics.add_counter(
        "tandem_edge_engine_busy_seconds",
        "Seconds llama.cpp slots spent serving requests, summed over slots.",
        lambda: engine.busy_seconds,
    )
    metrics.add_counter(
        "tandem_edge_cancelled_generations",
        "Generations stopped early because the client went away.",
        lambda: engine.cancelled_generations,
    )
    metrics.add_counter(
        "tandem_edge_prompt_pieces_cached",
        "Prompt pieces (text between special tokens) whose token ids came from the cache.",
        lambda: engine.token_cache.hits,
    )
    metrics.add_counter(
        "tandem_edge_prompt_pieces_tokenized",
        "Prompt pieces llama.cpp tokenized (not seen before, or evicted).",
        lambda: engine.token_cache.misses,
    )
    metrics.add_gauge(
        "tandem_edge_prompt_piece_cache_tokens",
        "Token ids held by the prompt-piece cache.",
        lambda: engine.token_cache.cached_tokens,
    )
    live = load_policy(settings.policy_file)
    metrics.add_gauge(
        "tandem_edge_policy_revision",
        "Store revision of the routing policy in force (0: a file or the built-in one).",
        lambda: live.revision or 0,
    )
    metrics.add_counter(
        "tandem_edge_policy_rejections",
        "Stored policy revisions refused as invalid (the last good one stayed in force).",
        lambda: live.rejections,
    )
    return EdgeState(
        settings=settings,
        engine=engine,
        prompts=PromptBuilder(template, engine.tokenize, config.n_ctx, engine.n_vocab),
        metrics=metrics,
        model_id=settings.model,
        created=unix_now(),
        live=live,
        observations=Observations(),
        classifier=_load_classifier(),
    )


def _load_classifier() -> ComplexityScorer | None:
    """The shipped complexity classifier; without it, complexity conditions never match."""
    try:
        from router.classifier import ClassifierError, ComplexityClassifier

        return ComplexityClassifier.load()
    except (ImportError, ClassifierError) as exc:
        logger.warning("no complexity classifier (%s); complexity rules will not match", exc)
        return None


def create_app(settings: EdgeSettings) -> FastAPI:
    """The FastAPI app of one edge daemon; the model loads at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(build_state, settings)
        app.state.edge = state
        if settings.nats_url:
            state.registration = MeshRegistration(settings, state.engine, state.live)
            await state.registration.start()
        logger.info("edge %s serving %s", settings.node_id, state.model_id)
        freeze_startup_objects()
        yield
        if state.registration:
            await state.registration.stop()
        await state.engine.close()

    app = FastAPI(title="Tandem edge", lifespan=lifespan)
    _install_error_handlers(app)
    _install_routes(app)
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
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["retry-after"] = str(exc.retry_after_s)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}" if loc else first["msg"], loc or None


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


def _check_auth(request: Request) -> None:
    key = _state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise AuthenticationError("missing or invalid API key; send 'Authorization: Bearer <key>'")


def _check_model(state: EdgeState, model: str) -> None:
    if base_model(model) != state.model_id and model not in state.policy.cloud_aliases:
        names = [
            state.model_id,
            f"{state.model_id}@edge",
            f"{state.model_id}@cloud",
            *state.policy.cloud_aliases,
        ]
        raise ModelNotFoundError(
            f"model {model!r} is not served here; available: {', '.join(names)}", param="model"
        )


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


async def _prime(
    request: Request, events: AsyncGenerator[TokenEvent | FinishEvent, None]
) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
    """Wait for the first event (queueing, prefill) so errors still get an HTTP status."""
    try:
        first = await _unless_disconnected(request, anext(events))
    except BaseException:
        await events.aclose()
        raise

    async def replay() -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        async with aclosing(events):
            yield first
            if not isinstance(first, FinishEvent):
                async for event in events:
                    yield event

    return replay()


def _generation(
    request: Request,
    prompt: list[int],
    max_tokens: int,
    body: ChatCompletionRequest | CompletionRequest,
) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=prompt,
        sampling=body.to_sampling_params(default_max_tokens=max_tokens),
        session_id=request.headers.get(SESSION_HEADER),
    )


async def _try_cloud(
    request: Request,
    state: EdgeState,
    body: ChatCompletionRequest,
    ctx: AnswerContext,
    resume_token_ids: list[int] | None = None,
) -> AsyncIterator[TokenEvent | FinishEvent] | None:
    """Events from the cloud route, or None to serve on the edge (marked edge-fallback)."""
    cloud = state.registration.cloud if state.registration else None
    try:
        if cloud is None or not cloud.available():
            raise CloudUnavailableError(
                "no cloud worker is reachable for this request; retry later or ask for the edge "
                "(model '<name>@edge' or header 'x-tandem-route: edge')"
            )
        events = await _prime(
            request,
            cloud.generate(
                messages=[m.to_template_dict() for m in body.messages],
                tools=body.active_tools(),
                tool_choice=_dump(body.tool_choice),
                sampling=WireSampling(
                    max_tokens=body.requested_max_tokens(),
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=body.seed,
                    stop=body.stop_list() or None,
                ),
                session_id=request.headers.get(SESSION_HEADER),
                deadline=deadline_in(state.settings.cloud_timeout_s),
                resume_token_ids=resume_token_ids,
            ),
        )
    except CloudUnavailableError:
        if state.policy.fallbacks.cloud_unavailable == "fail":
            raise
        logger.info("cloud unavailable; serving on the edge")
        ctx.route = "edge-fallback"
        return None
    ctx.route = "cloud"
    return events


def _route(
    request: Request, state: EdgeState, body: ChatCompletionRequest, prompt: list[int]
) -> tuple[RouteDecision, float | None]:
    """The policy's decision for a chat request (and the complexity score, if computed)."""
    policy = state.policy  # read once: a reload mid-request does not split the decision
    complexity = None
    if policy.uses_complexity and state.classifier is not None:
        try:
            complexity = state.classifier.score(
                prompt, has_tools=bool(body.active_tools()), n_messages=len(body.messages)
            )
        except ValueError as exc:  # e.g. a classifier trained for another model's vocabulary
            logger.warning("complexity not scored: %s", exc)
    features = chat_features(
        body,
        len(prompt),
        request.headers,
        edge_queue=state.engine.waiting,
        edge_slots=state.engine.config.slots,
        cloud_workers=state.cloud_workers(),
        observations=state.observations,
        complexity=complexity,
    )
    decision = decide(policy, features)
    state.metrics.route_decisions.labels(decision.route, decision.rule).inc()
    if decision.fail_reason is not None:
        raise CloudBudgetExceededError(decision.fail_reason)
    return decision, complexity


def _observer(
    state: EdgeState, request: Request, complexity: float | None
) -> Callable[[AnswerContext, GenerationStats], None]:
    """What the router learns when the answer is done."""
    tenant = request.headers.get(TENANT_HEADER) or DEFAULT_TENANT

    def done(ctx: AnswerContext, stats: GenerationStats) -> None:
        route = ctx.escalation.to if ctx.escalation else ctx.route
        state.observations.record(
            route=route, tenant=tenant, category=category(complexity), stats=stats,
            ttft_s=ctx.ttft_s, elapsed_s=time.perf_counter() - ctx.started,
        )  # fmt: skip

    return done


async def _escalating(
    request: Request,
    state: EdgeState,
    body: ChatCompletionRequest,
    ctx: AnswerContext,
    generation: GenerationRequest,
    events: AsyncGenerator[TokenEvent | FinishEvent, None],
) -> AsyncIterator[TokenEvent | FinishEvent]:
    """The edge's events; if the edge stops unsure, the rest of the same answer from the
    policy's escalation route, continuing after the tokens already sent."""
    emitted: list[int] = []
    handover: FinishEvent | None = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, FinishEvent) and event.stats.finish_reason == "escalate":
                handover = event
                break
            if isinstance(event, TokenEvent):
                emitted.extend(event.token_ids)
            yield event
    # Closed: the edge slot is free again (the continuation may need it).
    if handover is None:
        return
    if handover.text:
        yield TokenEvent([], handover.text)
    watch = generation.escalation
    assert watch is not None and watch.triggered_mean is not None
    target = state.policy.escalation.route
    rest = await _continuation(request, state, body, ctx, generation, emitted, target)
    ctx.escalation = EscalationUsage(
        at_token=len(emitted), mean_logprob=round(watch.triggered_mean, 4), to=ctx.route
    )
    ctx.route = "edge"  # the answer started here; usage.tandem.escalation says the rest
    state.metrics.escalations.labels(ctx.escalation.to).inc()
    new_tokens = 0
    async for more in rest:
        if isinstance(more, TokenEvent):
            new_tokens += len(more.token_ids)
        else:
            more.stats.prompt_tokens = handover.stats.prompt_tokens
            more.stats.cached_tokens = handover.stats.cached_tokens
            more.stats.completion_tokens = len(emitted) + new_tokens
        yield more


async def _continuation(
    request: Request,
    state: EdgeState,
    body: ChatCompletionRequest,
    ctx: AnswerContext,
    generation: GenerationRequest,
    emitted: list[int],
    target: str,
) -> AsyncIterator[TokenEvent | FinishEvent]:
    """The rest of an escalated answer, on ``target``; the edge finishes it itself if the
    cloud is not there (per the policy's cloud_unavailable fallback)."""
    if target == "cloud":
        events = await _try_cloud(request, state, body, ctx, resume_token_ids=emitted)
        if events is not None:
            return events
    rest = GenerationRequest(
        prompt_tokens=generation.prompt_tokens + emitted,
        sampling=replace(
            generation.sampling, max_tokens=generation.sampling.max_tokens - len(emitted)
        ),
        session_id=generation.session_id,
    )
    if target == "speculative":
        rest.verifier = _speculative_verifier(request, state, ctx, rest.sampling)
        rest.fallback_to_edge = state.policy.fallbacks.cloud_unavailable == "edge"
    return await _prime(request, state.engine.generate(rest))


def _speculative_verifier(
    request: Request, state: EdgeState, ctx: AnswerContext, sampling: SamplingParams
) -> Verifier | None:
    """The cloud verifier for the speculative route, or None to serve on the edge alone."""
    cloud = state.registration.cloud if state.registration else None
    if cloud is None or not cloud.available():
        if state.policy.fallbacks.cloud_unavailable == "fail":
            raise CloudUnavailableError("no cloud worker is reachable to verify drafts")
        ctx.route = "edge-fallback"
        return None
    ctx.route = "speculative"
    return cloud.verifier(
        asyncio.get_running_loop(),
        sampling=sampling,
        session_id=request.headers.get(SESSION_HEADER),
        deadline=deadline_in(state.settings.cloud_timeout_s),
    )


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


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
    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
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
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _check_auth(request)
        return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> ModelList:
        _check_auth(request)
        state = _state(request)
        card = ModelCard(id=state.model_id, created=state.created, max_model_len=state.engine.n_ctx)
        return ModelList(data=[card])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        _check_auth(request)
        state = _state(request)
        body = await parse_body(request, ChatCompletionRequest)
        _check_model(state, body.model)
        prompt = await asyncio.to_thread(state.prompts.chat_tokens, body)
        tools = body.active_tools()
        decision, complexity = _route(request, state, body, prompt)
        ctx = AnswerContext(
            model=body.model,
            node_id=state.settings.node_id,
            metrics=state.metrics,
            endpoint="chat",
            include_usage=body.include_usage(),
            rule=decision.rule,
            tool_names={t["function"]["name"] for t in tools} if tools else None,
            on_done=_observer(state, request, complexity),
        )
        route = decision.route
        events = await _try_cloud(request, state, body, ctx) if route == "cloud" else None
        if events is None:
            generation = _generation(request, prompt, state.prompts.completion_budget(
                len(prompt), body.requested_max_tokens()), body)  # fmt: skip
            if route == "speculative":
                generation.verifier = _speculative_verifier(
                    request, state, ctx, generation.sampling
                )
                generation.fallback_to_edge = state.policy.fallbacks.cloud_unavailable == "edge"
                generation.max_draft_tokens = decision.max_draft_tokens
            escalation = state.policy.escalation
            if ctx.route == "edge" and decision.escalate and escalation.enabled:
                generation.escalation = ConfidenceWatch(
                    escalation.window_tokens, escalation.min_mean_logprob, escalation.after_tokens
                )
            events = await _prime(request, state.engine.generate(generation))
            if generation.escalation is not None:
                events = _escalating(request, state, body, ctx, generation, events)
        if body.stream:
            return _streaming(answers.stream_chat(events, ctx), ctx)
        answer = await _unless_disconnected(request, answers.collect_chat(events, ctx))
        return JSONResponse(answer.model_dump(), headers=_route_headers(ctx))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        _check_auth(request)
        state = _state(request)
        body = await parse_body(request, CompletionRequest)
        _check_model(state, body.model)
        prompt = await asyncio.to_thread(state.prompts.completion_tokens, body)
        max_tokens = state.prompts.completion_budget(len(prompt), body.max_tokens)
        ctx = AnswerContext(
            model=state.model_id,
            node_id=state.settings.node_id,
            metrics=state.metrics,
            endpoint="completions",
            include_usage=body.include_usage(),
            id=new_id("cmpl"),
            rule="text-completions",  # served on the edge only; the policy routes chat
        )
        events = await _prime(
            request, state.engine.generate(_generation(request, prompt, max_tokens, body))
        )
        if body.stream:
            return _streaming(answers.stream_completion(events, ctx), ctx)
        answer = await _unless_disconnected(request, answers.collect_completion(events, ctx))
        return JSONResponse(answer.model_dump(), headers=_route_headers(ctx))


def serve(settings: EdgeSettings) -> None:
    """Run the edge daemon until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
