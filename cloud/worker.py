"""The cloud worker: a NATS micro service that streams vLLM generations to edges.

Wire flow of one escalated request::

    edge  --GenerateRequest-->  tandem.v1.cloud.<model>.generate  (queue group: any worker)
                            or  tandem.v1.worker.<id>.generate    (session affinity)
    edge  <--GenerateAccepted--  (the request's reply: who took it)
    edge  <--TokenChunk seq 0..n, the last with is_end-- published to GenerateRequest.reply_subject

The worker aborts the vLLM request when the edge sends a ``CancelRequest``, when
the edge's liveness inbox stops answering (it crashed), or at the deadline; on
SIGTERM it drains: no new requests, in-flight ones finish.

A cancel counts only from the request's owner: the node whose inbox the stream goes
to (``_INBOX.<node>...``, which on a secured mesh only that node can read), named by
the cancel's subject (``tandem.v1.cloud.<model>.cancel.<node>``, which the hub lets
only that node publish on). Another edge that learns a request id cannot cancel it.

Roles (``--role``, ``cloud.disaggregation``): a ``both`` worker is all of the above; a
``decode`` worker is too, and asks the prefill pool to compute long uncached prompts'
KV first (invisible to the edge); a ``prefill`` worker serves only that pool::

    decode worker --PrefillRequest--> tandem.v1.cloud.<model>.prefill (queue group)
                                  or  tandem.v1.worker.<id>.prefill   (session affinity)
    decode worker <--PrefillReply-- (the KV is in the connector)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from cloud.disaggregation import PrefillCounts, PrefixIndex, RemotePrefill
from cloud.engine import CloudEngine, Delta
from cloud.errors import (
    AtCapacityError,
    BadGenerateRequestError,
    CloudError,
    DeadlineExceededError,
    DrainingError,
    EngineFailedError,
    WrongModelError,
)
from cloud.prompt_reuse import PromptReuse
from cloud.settings import CloudSettings
from mesh import subjects
from mesh.bad_messages import note_bad_message
from mesh.connection import MeshCredentials, connect
from mesh.errors import ProtocolError
from mesh.heartbeat import Heartbeater
from mesh.protocol import (
    CancelRequest,
    GenerateAccepted,
    GenerateRequest,
    NodeHeartbeat,
    NodeLoad,
    PrefillReply,
    PrefillRequest,
    StreamUsage,
    TokenChunk,
    TokenLogprob,
    VerifyReply,
    VerifyRequest,
)
from mesh.version import __version__

logger = logging.getLogger(__name__)

W = TypeVar("W", GenerateRequest, VerifyRequest, PrefillRequest)


class _Stream:
    """Publishes one request's chunks in order, with the tokens not sent yet held here.

    The keepalive ticker flushes a stream that has been quiet for a keepalive period:
    its held tokens, or an empty chunk (a keepalive) when it holds none."""

    def __init__(self, nc: Client, request: GenerateRequest) -> None:
        self._nc = nc
        self._request = request
        self._seq = 0
        self.last_sent = time.monotonic()
        self._ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] | None = (
            [] if request.sampling.logprobs is not None else None
        )

    @property
    def held(self) -> int:
        """Tokens held, not sent yet."""
        return len(self._ids)

    def hold(self, delta: Delta) -> None:
        self._ids.extend(delta.token_ids)
        self._text.append(delta.text)
        if self._logprobs is not None:
            self._logprobs.extend(delta.logprobs or [])

    async def flush(self, **fields: Any) -> None:
        """Send the held tokens (if any) with ``fields`` in one chunk."""
        ids, text, logprobs = self._ids, "".join(self._text), self._logprobs
        self._ids, self._text = [], []
        if logprobs is not None:
            self._logprobs = []
        await self.send(token_ids=ids, text=text, logprobs=logprobs if ids else None, **fields)

    async def send(self, **fields: Any) -> None:
        chunk = TokenChunk(request_id=self._request.request_id, seq=self._seq, **fields)
        self._seq += 1
        # No flush(): it waits a PING/PONG round trip per chunk. publish() wakes nats-py's
        # flusher, which writes the buffer on the next loop iteration.
        await self._nc.publish(self._request.reply_subject, chunk.to_bytes())
        self.last_sent = time.monotonic()


@dataclass
class VerifyCounts:
    """Verification rounds this worker answered, and the draft tokens they judged."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class CloudWorker:
    """Serves ``generate`` for one model pair's target on the mesh."""

    def __init__(self, settings: CloudSettings, engine: CloudEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._nc: Client | None = None
        self._service: Service | None = None
        self._beats: Heartbeater | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._owners: dict[str, str | None] = {}  # request id: the node that may cancel it
        self._streams: dict[str, _Stream] = {}  # open answer streams, for the keepalive ticker
        self._keepalive_task: asyncio.Task[None] | None = None
        self._draining = False
        self._subscribed = False  # every endpoint and the cancel subject, once start() is done
        self._rate_mark = (time.monotonic(), 0)
        self._tokens_per_s = 0.0
        self.verify_counts = VerifyCounts()
        self._requests_total = 0  # generate requests admitted, for the planner's demand
        self._refused_at_capacity = 0  # generate requests refused by max_in_flight
        self._refused_wrong_model = 0  # requests naming a model this worker does not serve
        self._prompt_tokens_total = 0
        # The edge's prompt ids, reused when they check out (cloud.prompt_reuse).
        self.prompt_reuse = PromptReuse(engine.tokenize, lambda: engine.vocab_size)
        self.prefill_counts = PrefillCounts()
        self._remote: RemotePrefill | None = None  # decode role only (start)

    @property
    def in_flight(self) -> int:
        """Requests being generated now."""
        return len(self._tasks)

    @property
    def refused_at_capacity(self) -> int:
        """Generate requests refused because ``max_in_flight`` were in flight."""
        return self._refused_at_capacity

    @property
    def refused_wrong_model(self) -> int:
        """Requests refused because they named a model this worker does not serve."""
        return self._refused_wrong_model

    @property
    def draining(self) -> bool:
        """Whether SIGTERM's drain has begun (new requests are refused)."""
        return self._draining

    def unready_reason(self) -> str | None:
        """Why this worker should not be sent work now, or None when it is ready."""
        if self._draining:
            return "draining"
        if not self.engine.loaded:
            return "the engine is loading"
        if not self._subscribed:
            return "not subscribed on NATS yet"
        if self._nc is None or not self._nc.is_connected:
            return "the NATS connection is down"
        return None

    async def start(self) -> None:
        """Connect, register the micro service endpoints, start heartbeats."""
        s = self.settings
        credentials = MeshCredentials(s.nats_creds, s.nats_tls_ca)
        self._nc = await connect(s.nats_url, name=s.worker_id, credentials=credentials)
        model = self.engine.pair.name
        self._service = await add_service(
            self._nc,
            name=subjects.cloud_service_name(model),
            version=_semver(__version__),
            description=f"Tandem cloud worker for {model}",
            metadata={"worker_id": s.worker_id, "model": model},
            # $SRV.STATS carries the load too, for tools that poll instead of subscribing.
            stats_handler=lambda _endpoint: self.load().model_dump(mode="json"),
        )
        if s.role == "prefill":
            await self._serve_prefills(model)
        else:
            await self._serve_edges(model)
        if s.role == "decode":
            await self._follow_disaggregation(model)
        await self._nc.subscribe(subjects.cloud_cancels(model=model), cb=self.handle_cancel)
        self._beats = Heartbeater(
            self._nc, subjects.node_load(s.worker_id), self.beat, interval_s=s.heartbeat_s
        )
        await self._beats.start()
        self._keepalive_task = asyncio.create_task(self._keepalives(), name="keepalives")
        self._subscribed = True
        logger.info("%s worker %s serving %s on %s", s.role, s.worker_id, model, s.nats_url)

    async def _serve_edges(self, model: str) -> None:
        """generate and verify: the model's queue group and this worker's own subjects."""
        assert self._service is not None
        s = self.settings
        await self._service.add_endpoint(
            name="generate", subject=subjects.cloud_generate(model), handler=self.handle_generate
        )
        # Only this worker listens here: a session's later turns hit its prefix cache.
        await self._service.add_endpoint(
            name="generate-affinity",
            subject=subjects.worker(s.worker_id, "generate"),
            handler=self.handle_generate,
        )
        for name, subject in (
            ("verify", subjects.cloud_verify(model)),
            ("verify-affinity", subjects.worker(s.worker_id, "verify")),
        ):
            await self._service.add_endpoint(name=name, subject=subject, handler=self.handle_verify)

    async def _serve_prefills(self, model: str) -> None:
        """The prefill pool's queue group, and this worker's own subject (session affinity)."""
        assert self._service is not None
        for name, subject in (
            ("prefill", subjects.cloud_prefill(model)),
            ("prefill-affinity", subjects.worker(self.settings.worker_id, "prefill")),
        ):
            await self._service.add_endpoint(
                name=name, subject=subject, handler=self.handle_prefill
            )

    async def _follow_disaggregation(self, model: str) -> None:
        """Decode role: ask the prefill pool when the live policy says so."""
        assert self._nc is not None
        s, engine = self.settings, self.engine
        self._remote = RemotePrefill(
            self._nc,
            model,
            s.worker_id,
            timeout_s=s.prefill_timeout_s,
            max_model_len=s.max_model_len,
            index=PrefixIndex(engine.block_size, engine.cache_blocks),
            counts=self.prefill_counts,
        )
        await self._remote.start()

    def beat(self) -> NodeHeartbeat:
        """This worker's heartbeat now (it also restarts the tokens/s window)."""
        now, tokens = time.monotonic(), self.engine.load.generated_tokens
        then, before = self._rate_mark
        self._rate_mark = (now, tokens)
        self._tokens_per_s = max(0.0, (tokens - before) / max(now - then, 1e-6))
        return NodeHeartbeat(
            node_id=self.settings.worker_id,
            role="cloud",
            model=self.engine.pair.name,
            version=__version__,
            load=self.load(),
            simulated=self.engine.simulated,
            worker_role=self.settings.role,
        )

    def load(self) -> NodeLoad:
        """This worker's load now; tokens/s is over the last heartbeat interval."""
        load = self.engine.load
        waiting = min(load.waiting, self.in_flight)
        return NodeLoad(
            # In-flight requests are authoritative; vLLM's scheduler stats only say how
            # many of them wait, and go stale when the engine idles.
            running=max(0, self.in_flight - waiting),
            waiting=waiting,
            kv_cache_usage=min(1.0, max(0.0, load.kv_cache_usage)),
            tokens_per_s=self._tokens_per_s,
            prefix_cache_hit_rate=load.prefix_hit_rate,
            draining=self._draining,
            engine_busy_s=self.engine.busy.busy_s,
            requests_total=self._requests_total,
            prompt_tokens_total=self._prompt_tokens_total,
            output_tokens_total=load.generated_tokens,
            engine_tokens_computed=load.computed_tokens,
        )

    # -- handlers -------------------------------------------------------------

    async def handle_generate(self, msg: Request) -> None:
        """Accept a generate request (reply at once) and stream it in a task."""
        request = await self._admit(msg, GenerateRequest)
        if request is None:
            return
        accepted = GenerateAccepted(
            request_id=request.request_id, worker_id=self.settings.worker_id
        )
        await msg.respond(accepted.to_bytes())
        self._requests_total += 1
        owner = subjects.inbox_owner(request.reply_subject)
        self._track(request.request_id, owner, self._serve(request))

    async def handle_verify(self, msg: Request) -> None:
        """Score an edge's drafts (one forward pass) and reply with the verdict."""
        request = await self._admit(msg, VerifyRequest)
        if request is not None:
            # Replies must not wait for each other: vLLM batches concurrent verifications.
            # No owner: a verification is one round trip bounded by its deadline, and
            # requesters never cancel one.
            self._track(request.request_id, None, self._verify(msg, request))

    async def handle_prefill(self, msg: Request) -> None:
        """Prefill role: compute a prompt's KV for a decode worker and reply when it is in
        the connector."""
        request = await self._admit(msg, PrefillRequest)
        if request is not None:
            # No owner: one round trip bounded by its deadline, like a verification.
            self._track(request.request_id, None, self._prefill_one(msg, request))

    async def _prefill_one(self, msg: Request, request: PrefillRequest) -> None:
        vocab = self.engine.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            await _refuse(
                msg, BadGenerateRequestError(f"token id {bad[0]} is outside the vocabulary")
            )
            return
        budget = None if request.deadline is None else request.deadline - time.time()
        try:
            async with asyncio.timeout(budget):
                result = await self.engine.prefill(
                    request.request_id, request.prompt_token_ids, request.kv_transfer_params
                )
        except TimeoutError:
            await self.engine.abort(request.request_id)
            await _refuse(msg, DeadlineExceededError("the prefill's deadline passed"))
            return
        except CloudError as exc:
            await _refuse(msg, exc)
            return
        except Exception as exc:  # never leave the decode worker waiting for nothing
            logger.exception("prefill %s failed", request.request_id)
            await _refuse(msg, EngineFailedError(f"prefill failed: {exc}"))
            return
        self.prefill_counts.served += 1
        self._prompt_tokens_total += len(request.prompt_token_ids)
        reply = PrefillReply(
            request_id=request.request_id,
            worker_id=self.settings.worker_id,
            prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=result.cached_tokens,
            first_token=result.first_token,
            kv_transfer_params=result.kv_transfer_params,
            simulated=self.engine.simulated,
            engine_s=result.engine_s,
        )
        await msg.respond(reply.to_bytes())

    async def _admit(self, msg: Request, kind: type[W]) -> W | None:
        """The decoded request, or None after answering 400 (undecodable) or 503 (draining)."""
        try:
            request = kind.from_bytes(msg.data)
        except ProtocolError as exc:
            note_bad_message(kind.__name__, msg.subject, exc, logger)
            await _refuse(msg, BadGenerateRequestError(str(exc)))
            return None
        if self._draining:
            await _refuse(msg, DrainingError("worker is draining"))
            return None
        if request.model != self.settings.model:
            # Never serve one model's request with another's weights: the answer would
            # look right and be wrong. Reached through a worker's own subjects only (the
            # queue groups are per model).
            await _refuse(msg, WrongModelError(
                f"worker {self.settings.worker_id} serves {self.settings.model!r}, "
                f"not {request.model!r}"
            ))  # fmt: skip
            self._refused_wrong_model += 1
            return None
        cap = self.settings.max_in_flight
        if kind is GenerateRequest and cap is not None and self.in_flight >= cap:
            # Refused at once rather than queued until the deadline: the edge can still
            # use another worker, or its own model, in the time a queue would have taken.
            await _refuse(msg, AtCapacityError(
                f"worker {self.settings.worker_id} is at capacity ({cap} requests in flight)"
            ))  # fmt: skip
            self._refused_at_capacity += 1
            return None
        return request

    def _track(self, request_id: str, owner: str | None, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that cancels (from ``owner`` only) and drains find by
        request id."""
        task = asyncio.create_task(work, name=request_id)
        self._tasks[request_id] = task
        self._owners[request_id] = owner
        task.add_done_callback(lambda _: self._forget(request_id, task))

    def _forget(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
            self._owners.pop(request_id, None)

    async def _verify(self, msg: Request, request: VerifyRequest) -> None:
        vocab = self.engine.vocab_size
        q_ids = [t for d in request.draft_distributions or [] for t in d.token_ids]
        ids = request.context_token_ids + request.draft_token_ids + q_ids
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            outside = BadGenerateRequestError(f"token id {bad[0]} is outside the vocabulary")
            await _refuse(msg, outside)
            return
        budget = None if request.deadline is None else request.deadline - time.time()
        try:
            async with asyncio.timeout(budget):
                verdict, cached = await self.engine.verify(
                    request.request_id,
                    request.context_token_ids,
                    request.draft_token_ids,
                    request.sampling,
                    request.draft_distributions,
                )
        except TimeoutError:
            await self.engine.abort(request.request_id)
            await _refuse(msg, DeadlineExceededError("the verification's deadline passed"))
            return
        except CloudError as exc:
            await _refuse(msg, exc)
            return
        except Exception as exc:  # never leave the edge waiting for a reply that won't come
            logger.exception("verification %s failed", request.request_id)
            await _refuse(msg, EngineFailedError(f"verification failed: {exc}"))
            return
        if not 0 <= verdict.next_token < vocab:  # never hand an edge a token it cannot hold
            wrong = EngineFailedError(f"the target produced token {verdict.next_token}")
            await _refuse(msg, wrong)
            return
        if self._remote is not None:  # vLLM caches the verified context
            self._remote.index.add(request.context_token_ids)
        counts = self.verify_counts
        counts.rounds += 1
        counts.draft_tokens += len(request.draft_token_ids)
        counts.accepted_tokens += verdict.accepted
        await msg.respond(
            VerifyReply(
                request_id=request.request_id,
                worker_id=self.settings.worker_id,
                context_len=len(request.context_token_ids),
                accepted=verdict.accepted,
                next_token=verdict.next_token,
                cached_tokens=cached,
                margins=list(verdict.margins),
                logprobs=None if verdict.logprobs is None else list(verdict.logprobs),
            ).to_bytes()
        )

    async def handle_cancel(self, msg: Any) -> None:
        """Abort a request this worker is serving if its owner asks (broadcast: other
        workers ignore it; a cancel from another node is refused)."""
        try:
            cancel = CancelRequest.from_bytes(msg.data)
        except ProtocolError as exc:
            note_bad_message("CancelRequest", msg.subject, exc, logger)
            return
        task = self._tasks.get(cancel.request_id)
        if task is None:
            return
        sender, owner = subjects.cancel_sender(msg.subject), self._owners.get(cancel.request_id)
        if sender != owner:
            logger.warning(
                "refused a cancel of %s from %s: its owner is %s",
                cancel.request_id,
                sender,
                owner or "none (not cancellable)",
            )
            return
        logger.info("requester cancelled %s", cancel.request_id)
        task.cancel()

    # -- one request --------------------------------------------------------

    async def _serve(self, request: GenerateRequest) -> None:
        assert self._nc is not None
        stream = _Stream(self._nc, request)
        self._streams[request.request_id] = stream
        watcher = asyncio.create_task(self._watch_requester(request))
        try:
            # The requester's deadline bounds queueing in vLLM as well as generation.
            budget = None if request.deadline is None else request.deadline - time.time()
            async with asyncio.timeout(budget):
                await self._generate(request, stream)
        except TimeoutError:
            await self.engine.abort(request.request_id)
            error = DeadlineExceededError("the request's deadline passed on the cloud worker")
            await stream.send(is_end=True, finish_reason="error", error=error.info())
        except asyncio.CancelledError:
            await self.engine.abort(request.request_id)
            logger.info("aborted %s in vLLM", request.request_id)
            raise
        except CloudError as exc:
            await self.engine.abort(request.request_id)
            await stream.send(is_end=True, finish_reason="error", error=exc.info())
        except Exception as exc:
            logger.exception("request %s failed", request.request_id)
            await self.engine.abort(request.request_id)
            await stream.send(
                is_end=True, finish_reason="error", error=EngineFailedError(str(exc)).info()
            )
        finally:
            self._streams.pop(request.request_id, None)
            watcher.cancel()

    async def _generate(self, request: GenerateRequest, stream: _Stream) -> None:
        checked = self.engine.validate(request.messages, request.tools, request.tool_choice)
        text = self.engine.render_text(request.messages, request.tools)
        prompt = self.prompt_reuse.token_ids(text, request.prompt)
        self._prompt_tokens_total += len(prompt)
        transfer: dict[str, Any] | None = None
        generated: list[int] = []
        if self._remote is not None:  # decode role
            transfer = await self._remote.kv_for(request, prompt + request.resume_token_ids)
        text_parts: list[str] = []
        completion = len(request.resume_token_ids)
        cached = 0
        finish: str | None = None
        engine_s: float | None = None
        # The first tokens go out at once, streamed or not: time to first token is what
        # the edge measures the cloud by (the policy's cloud latency, the TTFT metric).
        # Streaming, later ones go in messages of ``stream_interval`` tokens. Not
        # streaming (the client sees the answer whole), they wait for the keepalive
        # ticker, which sends what a quiet stream holds once per keepalive period (the
        # edge's stall check and a failover's resume point stay as fresh as with
        # keepalives), instead of one message per token. Either way the last ones ride in
        # the end chunk (one message fewer per answer).
        interval = self.settings.stream_interval if request.streaming else None
        first = True
        async for delta in self.engine.generate(
            request.request_id,
            prompt,
            request.sampling,
            request.resume_token_ids,
            kv_transfer_params=transfer,
        ):
            completion += len(delta.token_ids)
            generated.extend(delta.token_ids)
            cached = delta.cached_tokens
            text_parts.append(delta.text)
            finish = delta.finish_reason
            engine_s = delta.engine_s if delta.engine_s is not None else engine_s
            stream.hold(delta)
            if delta.finish_reason is not None or not (stream.held or delta.text):
                continue
            if first or (interval is not None and stream.held >= interval):
                await stream.flush()
                first = False
        if self._remote is not None:  # vLLM now caches the prompt and the answer
            self._remote.index.add(prompt + request.resume_token_ids + generated)
        _, tool_calls = self.engine.parse_tool_calls("".join(text_parts), checked)
        await stream.flush(
            is_end=True,
            finish_reason="tool_calls" if tool_calls else (finish or "stop"),
            tool_calls=tool_calls,
            usage=StreamUsage(
                prompt_tokens=len(prompt),
                completion_tokens=completion,
                cached_tokens=cached,
                worker_id=self.settings.worker_id,
                simulated=self.engine.simulated,
                engine_s=engine_s,
            ),
        )

    async def _keepalives(self) -> None:
        """A chunk on each stream quiet for a keepalive period, so the edge can tell slow
        from dead: the tokens it holds, or an empty chunk (a keepalive).

        One ticker for all streams: a loop per request woke every quarter second
        for each of hundreds of requests waiting in vLLM's queue.
        """
        period = self.settings.keepalive_s
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            for stream in [s for s in self._streams.values() if now - s.last_sent >= period]:
                with contextlib.suppress(Exception):  # NATS away: the edge's failover acts
                    await stream.flush()

    async def _watch_requester(self, request: GenerateRequest) -> None:
        """Abort when the requester's liveness inbox stops answering (it went away)."""
        assert self._nc is not None
        subject = subjects.liveness(request.reply_subject)
        while True:
            await asyncio.sleep(self.settings.liveness_s)
            try:
                await self._nc.request(subject, b"", timeout=self.settings.liveness_s)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                logger.info("requester of %s is gone; aborting", request.request_id)
                task = self._tasks.get(request.request_id)
                if task is not None:
                    task.cancel()
                return

    # -- lifecycle ----------------------------------------------------------

    async def drain(self) -> None:
        """Take no new requests, let in-flight ones finish (bounded), then disconnect."""
        self._draining = True
        if self._beats is not None:
            await self._beats.beat()  # edges stop routing here at once (never raises)
        if self._service is not None:
            with contextlib.suppress(Exception):  # NATS may be gone already; drain anyway
                await self._service.stop()
        if self._tasks:
            logger.info("draining %d in-flight request(s)", len(self._tasks))
            _, pending = await asyncio.wait(
                list(self._tasks.values()), timeout=self.settings.drain_timeout_s
            )
            for task in pending:
                task.cancel()
        if self._beats is not None:
            await self._beats.stop()
        if self._remote is not None:
            await self._remote.stop()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()


async def _refuse(msg: Request, error: CloudError) -> None:
    """Answer a request with ``error`` as micro-service error headers (no stream follows)."""
    await msg.respond_error(*error.info().service_error())


def _semver(version: str) -> str:
    """nats.micro wants strict semver; source trees report '0.0.0+source'."""
    core = version.split("+")[0]
    return core if core.count(".") == 2 else "0.0.0"
