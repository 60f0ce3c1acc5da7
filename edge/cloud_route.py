"""The edge's cloud route: send a chat to a cloud worker over NATS and relay its stream.

- Session affinity: a session's requests go to the worker that served it last
  (``tandem.v1.worker.<id>.generate``) while that worker is healthy, so vLLM's
  prefix cache hits; otherwise to the model's queue group.
- Failover: a stream that goes quiet (no chunk, not even a keepalive, for
  ``stall_timeout_s``) is resumed on another worker from the tokens already
  received; the client sees one continuous stream.
- Cancellation: closing the event iterator (client disconnect) publishes a
  ``CancelRequest`` under this edge's name (workers honour it only from the node
  whose inbox the stream goes to); a crashed edge stops answering its liveness
  inbox and the worker aborts on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from edge.drafter import Confirmed, Draft, Verifier
from edge.errors import CloudRequestError, CloudUnavailableError
from edge.generation import FinishEvent, GenerationStats, TokenEvent
from edge.sampling import SamplingParams as EdgeSampling
from mesh import subjects
from mesh.connection import MeshLink
from mesh.errors import ProtocolError
from mesh.heartbeat import FleetView
from mesh.inbox import InboxMux
from mesh.protocol import (
    CancelRequest,
    ErrorCode,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    RenderedPrompt,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    VerifyReply,
    VerifyRequest,
)
from mesh.sequencer import ChunkSequencer

logger = logging.getLogger(__name__)

_AFFINITY_ENTRIES = 100_000
# Workers asked by their own subjects after a failover, before the queue group.
_FAILOVER_CANDIDATES = 3


class _WorkerLostError(Exception):
    """The serving worker went quiet mid-stream (caught here: the stream fails over)."""


class CloudRoute:
    """Requests generations from the cloud fleet of one model."""

    def __init__(
        self,
        link: MeshLink,
        fleet: FleetView,
        model: str,
        *,
        accept_timeout_s: float = 2.0,
        stall_timeout_s: float = 3.0,
        max_failovers: int = 2,
        emulated_rtt_s: float = 0.0,
    ) -> None:
        self._link = link
        self._fleet = fleet
        self._model = model
        self._accept_timeout_s = accept_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._max_failovers = max_failovers
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._inboxes = InboxMux()
        # Benchmarks emulate a WAN between edge and cloud: half on the way out, half back.
        self._half_rtt_s = emulated_rtt_s / 2
        self.failovers = 0

    def available(self) -> bool:
        """Whether the mesh is up and at least one healthy worker serves the model."""
        return self._link.connected and bool(self._fleet.healthy_workers(self._model))

    def _nc(self) -> Client:
        nc = self._link.nc
        if nc is None or not nc.is_connected:
            raise CloudUnavailableError("the edge is not connected to the mesh")
        return nc

    async def generate(
        self,
        *,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        tool_choice: Any,
        sampling: SamplingParams,
        session_id: str | None,
        deadline: float | None,
        resume_token_ids: list[int] | None = None,
        streaming: bool = True,
        prompt: RenderedPrompt | None = None,
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Stream a cloud generation as engine-style events, failing over if a worker dies.

        ``resume_token_ids``: the answer's tokens so far (an edge answer escalated midway);
        the worker continues after them, and only new tokens are streamed back.
        ``streaming`` False: the client sees the answer whole, so the worker may send
        tokens in a few larger chunks (``GenerateRequest.streaming``). ``prompt``: the
        chat as this edge rendered and tokenized it (the worker may reuse the ids)."""
        nc = self._nc()
        inbox, chunks = await self._inboxes.open(nc)
        base = GenerateRequest(
            request_id=uuid.uuid4().hex,
            session_id=session_id,
            model=self._model,
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,
            sampling=sampling,
            reply_subject=inbox,
            deadline=deadline,
            streaming=streaming,
            prompt=prompt,
        )
        received: list[int] = list(resume_token_ids or [])
        attempt_id: str | None = None
        finished = False
        quiet: set[str] = set()  # workers that went quiet on this answer: not again
        try:
            for attempt in range(self._max_failovers + 1):
                attempt_id = f"{base.request_id}.{attempt}"
                request = base.model_copy(
                    update={"request_id": attempt_id, "resume_token_ids": list(received)}
                )
                worker = await self._submit(nc, request, avoid=quiet)
                try:
                    async for event in self._relay(chunks, attempt_id, received, worker):
                        finished = finished or isinstance(event, FinishEvent)
                        yield event
                    return
                except _WorkerLostError:
                    self.failovers += 1
                    quiet.add(worker)
                    silent_s = self._fleet.quiet_s("cloud")
                    if silent_s >= self._stall_timeout_s:
                        # Every worker went quiet together: the link to the mesh is down
                        # (a partition), not one worker. Asking the others would only
                        # wait out their accept timeouts (measured: ~9 s more); the
                        # policy's fallback can act now.
                        raise CloudUnavailableError(
                            f"no cloud worker heard from for {silent_s:.1f} s "
                            f"(worker {worker} went quiet after {len(received)} tokens)"
                        ) from None
                    self._forget_worker(worker)
                    # A stalled worker (stopped, not dead) would go on generating once it
                    # resumes: cancel its attempt (its chunks are ignored by attempt id).
                    with contextlib.suppress(Exception):
                        cancel = CancelRequest(request_id=attempt_id)
                        await nc.publish(self._cancel_subject(inbox), cancel.to_bytes())
                    logger.warning(
                        "worker %s went quiet on %s after %d tokens; failing over",
                        worker,
                        base.request_id,
                        len(received),
                    )
            raise CloudUnavailableError(
                f"the cloud stream failed {self._max_failovers + 1} times; giving up"
            )
        finally:
            if not finished and attempt_id is not None:
                with contextlib.suppress(Exception):
                    await nc.publish(
                        self._cancel_subject(inbox), CancelRequest(request_id=attempt_id).to_bytes()
                    )
            self._inboxes.close(inbox)

    def _cancel_subject(self, inbox: str) -> str:
        """Cancels go out as the owner of the stream's inbox: the node the workers check
        them against, and on a secured mesh the only name this edge may send them as."""
        owner = subjects.inbox_owner(inbox)
        assert owner is not None, f"not an inbox: {inbox}"
        return subjects.cloud_cancel(self._model, owner)

    async def _submit(
        self, nc: Client, request: GenerateRequest, avoid: set[str] | None = None
    ) -> str:
        """Hand the request to a worker (affinity first; after a failover, straight to
        another worker than those in ``avoid``); return the worker id."""
        reply = await self._request_any(
            nc, request.session_id, "generate", request.to_bytes(), self._accept_timeout_s,
            avoid=avoid,
        )  # fmt: skip
        accepted = GenerateAccepted.from_bytes(reply.data)
        if request.session_id:
            self._remember(request.session_id, accepted.worker_id)
        return accepted.worker_id

    async def verify(
        self,
        context: list[int],
        draft: Draft,
        *,
        sampling: SamplingParams | None,
        session_id: str | None,
        deadline: float | None,
    ) -> VerifyReply:
        """One verification round trip (affinity first, so the worker's prefix cache hits)."""
        request = VerifyRequest(
            request_id=uuid.uuid4().hex,
            session_id=session_id,
            model=self._model,
            context_token_ids=context,
            draft_token_ids=draft.tokens,
            sampling=sampling,
            draft_distributions=draft.distributions,
            deadline=deadline,
        )
        reply = await self._request_any(
            self._nc(), session_id, "verify", request.to_bytes(), self._stall_timeout_s
        )
        verdict = VerifyReply.from_bytes(reply.data)
        if (
            verdict.request_id != request.request_id
            or verdict.context_len != len(context)
            or verdict.accepted > len(draft)
        ):
            # Never splice a reply that does not belong to this state.
            raise CloudRequestError.bad_reply("verify reply does not match")
        if session_id:
            self._remember(session_id, verdict.worker_id)
        return verdict

    async def _request_any(
        self,
        nc: Client,
        session_id: str | None,
        verb: str,
        payload: bytes,
        wait_s: float,
        avoid: set[str] | None = None,
    ) -> Msg:
        """Request/reply with the session's worker, then the queue group; skip those that
        refuse for now (draining, at capacity), and say why when all did."""
        refusals: list[str] = []
        candidates = self._subjects_for(session_id, verb, avoid)
        asked_others = False
        for subject in candidates:  # grows once, below
            try:
                await self._wan()
                reply = await nc.request(subject, payload, timeout=wait_s)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                continue
            error = _service_error(reply)
            if error is not None and error.code == ErrorCode.UNAVAILABLE:
                refusals.append(error.message)
                if not asked_others:
                    # The queue group picks a member at random, full or not: ask the
                    # others by their own subjects, least loaded first, before giving up.
                    asked_others = True
                    candidates.extend(
                        s for s in self._other_workers(verb, avoid) if s not in candidates
                    )
                continue  # draining or at capacity; try the next subject
            if error is not None:
                raise CloudRequestError(error)
            await self._wan()
            return reply
        why = f" ({'; '.join(dict.fromkeys(refusals))})" if refusals else ""
        raise CloudUnavailableError(f"no cloud worker serves {self._model!r} {verb} right now{why}")

    async def _wan(self) -> None:
        if self._half_rtt_s:
            await asyncio.sleep(self._half_rtt_s)

    def verifier(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        sampling: EdgeSampling,
        session_id: str | None,
        deadline: float | None,
    ) -> Verifier:
        """A verify for an engine slot's thread: it returns a future at once and the round
        trip runs on ``loop``, so the slot drafts ahead meanwhile. A temperature above 0
        selects the rejection-sampling rule (the drafts carry q)."""
        wire = (
            None
            if sampling.greedy and sampling.logprobs is None
            else SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                logprobs=sampling.logprobs,
            )
        )

        async def verdict(context: list[int], draft: Draft) -> Confirmed:
            reply = await self.verify(
                context, draft, sampling=wire, session_id=session_id, deadline=deadline
            )
            return Confirmed(reply.accepted, reply.next_token, reply.logprobs)

        def verify(context: list[int], draft: Draft) -> Future[Confirmed]:
            return asyncio.run_coroutine_threadsafe(verdict(context, draft), loop)

        return verify

    def _subjects_for(
        self, session_id: str | None, verb: str = "generate", avoid: set[str] | None = None
    ) -> list[str]:
        queue = (subjects.cloud_generate if verb == "generate" else subjects.cloud_verify)(
            self._model
        )
        if avoid:
            # A failover: the queue group could hand the request back to the worker that
            # went quiet (a stopped process keeps its subscriptions; measured: 25 of 80
            # streams failed this way under SIGSTOP, bench/fault_bench.py). Ask other
            # workers by their own subjects, least loaded first, the group last.
            return [*self._other_workers(verb, avoid), queue]
        worker = self._affinity.get(session_id) if session_id else None
        if worker is not None and self._fleet.is_healthy_worker(self._model, worker):
            return [subjects.worker(worker, verb), queue]
        return [queue]

    def _other_workers(self, verb: str, avoid: set[str] | None) -> list[str]:
        """Own subjects of up to ``_FAILOVER_CANDIDATES`` healthy workers not in ``avoid``,
        least loaded first."""
        others = [
            b.node_id for b in self._fleet.healthy_workers(self._model)
            if not avoid or b.node_id not in avoid
        ][:_FAILOVER_CANDIDATES]  # fmt: skip
        return [subjects.worker(w, verb) for w in others]

    def _remember(self, session_id: str, worker: str) -> None:
        self._affinity[session_id] = worker
        self._affinity.move_to_end(session_id)
        while len(self._affinity) > _AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def _forget_worker(self, worker: str) -> None:
        for session in [s for s, w in self._affinity.items() if w == worker]:
            del self._affinity[session]

    async def _relay(
        self, chunks: asyncio.Queue[Msg], attempt_id: str, received: list[int], worker: str
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Events of one attempt's stream; raises _WorkerLostError if it goes quiet.

        Chunks already queued when the relay wakes go out as one event: the client
        could not tell them apart in time anyway, and each event costs an answer-builder
        step and (streaming) an SSE write. A chunk alone in the queue goes out at once,
        so time to first token and the worker's ``stream_interval`` are unchanged."""
        order = ChunkSequencer(attempt_id)
        while True:
            if chunks.empty():
                # asyncio.timeout, not wait_for: wait_for makes a task per chunk.
                try:
                    async with asyncio.timeout(self._stall_timeout_s):
                        msg = await chunks.get()
                except TimeoutError as exc:
                    raise _WorkerLostError(worker) from exc
            else:
                msg = chunks.get_nowait()
            batch = _TokenBatch()
            while True:
                for c in self._deliverable(order, msg, attempt_id):
                    if c.error is not None:
                        event = batch.take()  # what came before the error, as before
                        if event is not None:
                            yield event
                        raise CloudRequestError(c.error)
                    if c.token_ids or c.text:
                        received.extend(c.token_ids)
                        event = batch.add(c)
                        if event is not None:
                            yield event
                    if c.is_end:
                        event = batch.take()
                        if event is not None:
                            yield event
                        yield FinishEvent(
                            text="", stats=_stats(c, len(received), worker), tool_calls=c.tool_calls
                        )
                        return
                if chunks.empty():
                    break
                msg = chunks.get_nowait()
            event = batch.take()
            if event is not None:
                yield event

    @staticmethod
    def _deliverable(order: ChunkSequencer, msg: Msg, attempt_id: str) -> list[TokenChunk]:
        """The chunks ``msg`` makes deliverable, in order (none for a late chunk)."""
        try:
            chunk = TokenChunk.from_bytes(msg.data)
            if chunk.request_id != attempt_id:
                return []  # a late chunk of an abandoned attempt
            return order.push(chunk)
        except ProtocolError as exc:
            raise CloudRequestError.bad_reply(f"bad stream from cloud: {exc}") from exc


class _TokenBatch:
    """Token chunks that arrived together, merged into one ``TokenEvent``.

    Chunks with logprobs and chunks without are never merged (the event's logprobs
    are one per token id, or none)."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] | None = None
        self._empty = True

    def add(self, chunk: TokenChunk) -> TokenEvent | None:
        """Hold ``chunk``; return the event held so far if ``chunk`` cannot join it."""
        flushed = None
        if not self._empty and (self._logprobs is None) != (chunk.logprobs is None):
            flushed = self.take()
        if self._empty:
            self._logprobs = None if chunk.logprobs is None else []
            self._empty = False
        self._ids.extend(chunk.token_ids)
        self._text.append(chunk.text)
        if self._logprobs is not None and chunk.logprobs is not None:
            self._logprobs.extend(chunk.logprobs)
        return flushed

    def take(self) -> TokenEvent | None:
        """The held chunks as one event (None when none is held); the batch empties."""
        if self._empty:
            return None
        event = TokenEvent(self._ids, "".join(self._text), self._logprobs)
        self._ids, self._text, self._logprobs, self._empty = [], [], None, True
        return event


def _service_error(reply: Msg) -> ErrorInfo | None:
    """The error a worker refused a request with, if it did."""
    try:
        return ErrorInfo.from_service_headers(reply.headers)
    except ProtocolError as exc:
        raise CloudRequestError.bad_reply(str(exc)) from exc


def _stats(end: TokenChunk, completion_tokens: int, worker: str) -> GenerationStats:
    usage = end.usage
    return GenerationStats(
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
        completion_tokens=completion_tokens,
        finish_reason=end.finish_reason,
        worker_id=worker,
        simulated=usage.simulated if usage else False,
        engine_s=usage.engine_s if usage else None,
    )


def deadline_in(seconds: float) -> float:
    """A unix-time deadline ``seconds`` from now, as the wire protocol carries it."""
    return time.time() + seconds
