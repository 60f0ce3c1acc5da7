"""The llama.cpp engine: slots, a bounded queue, and cancellable token streams.

One ``Llama`` object is not safe for concurrent calls, so the engine owns a
fixed number of *slots*, each a ``Llama`` context with its own single thread.
A request waits (in FIFO order, bounded: 429 past ``max_queue``) for a free
slot and then runs to completion on it: no request ever interrupts another.
Tokens cross from the slot thread to the event loop one by one, so streaming
is immediate and a cancelled request stops at the next token.

Prefix reuse: a slot keeps its last conversation in its KV cache, and before a
slot is handed a different conversation its state is saved in the
``SessionCache``; a returning conversation gets the slot or saved state with the
longest common prefix, so its second turn evaluates only the new tokens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.drafter import (
    Draft,
    DraftLength,
    DraftTimer,
    Verifier,
    continues,
    draft_ahead,
    draft_block,
    greedy_pick,
    prefill,
    rollback,
    sampled_pick,
)
from edge.errors import EngineError
from edge.escalation import ConfidenceWatch, last_logits, token_logprob
from edge.sampling import SamplingParams
from edge.sessions import SavedState, SessionCache, common_prefix_len
from edge.slot_queue import SlotQueue
from edge.text import TextAssembler
from models.token_cache import CachedTokenizer, cached_llama_tokenizer
from models.vocab import llama_token_bytes

logger = logging.getLogger(__name__)

# Restoring a saved state costs a memcpy of its KV; only worth it for a real gain.
_MIN_RESTORE_GAIN_TOKENS = 8


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to load a model; built from the edge settings."""

    model_path: Path
    n_ctx: int = 2048
    n_threads: int = 1
    n_threads_batch: int = 1
    n_batch: int = 512
    slots: int = 1
    max_queue: int = 64
    session_cache_bytes: int = 512 * 1024 * 1024


@dataclass
class GenerationRequest:
    """One prompt to complete on the engine."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    session_id: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set for the speculative route: the cloud verifies drafts (greedy or sampled).
    verifier: Verifier | None = None
    fallback_to_edge: bool = True  # when verification fails mid-answer
    max_draft_tokens: int | None = None  # the policy's cap on the draft length
    # Edge route: stop (finish_reason "escalate") when the model grows unsure.
    escalation: ConfidenceWatch | None = None


@dataclass
class GenerationStats:
    """What one generation cost; filled in as it runs."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    finish_reason: str | None = None
    worker_id: str | None = None  # the cloud worker that served it, on the cloud route
    drafted: int = 0  # speculative route: draft tokens sent for verification
    accepted: int = 0  # ... of which the target kept
    verify_rounds: int = 0
    pipelined_rounds: int = 0  # ... whose draft was drafted during the previous round trip
    fell_back: bool = False  # ... the cloud went away and the edge finished the answer
    simulated: bool = False  # a simulated engine (edge or cloud) produced the answer
    engine_s: float | None = None  # simulated engines only: modelled queue + compute time


@dataclass(frozen=True)
class TokenEvent:
    """Newly generated tokens and the text they made final (may be empty)."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """End of generation: the last text, why it stopped, and parsed tool calls if the
    generator parsed them itself (the cloud route does, with vLLM's parser)."""

    text: str
    stats: GenerationStats
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class _ErrorEvent:
    error: BaseException


class _Slot:
    """One llama.cpp context and the single thread allowed to touch it."""

    def __init__(self, index: int, llama: Any) -> None:
        self.index = index
        self.llama = llama
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"llama-slot-{index}")
        self.session_key: str | None = None
        # Not Llama.detokenize: it drops pieces longer than 32 bytes (e.g. runs of spaces).
        self.token_bytes = llama_token_bytes(llama)

    def tokens(self) -> np.ndarray:
        """The tokens whose KV this slot holds now."""
        return np.asarray(self.llama._input_ids)

    def save(self) -> SavedState:
        """Snapshot the KV cache (not the 100 MB logits buffer LlamaState copies)."""
        import llama_cpp

        ctx = self.llama._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (llama_cpp.ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_get_data(ctx, buf, size)
        return SavedState(tokens=self.tokens().copy(), kv_bytes=bytes(buf)[:n])

    def restore(self, state: SavedState) -> None:
        """Load a saved KV state; the next ``generate`` evaluates past it only."""
        import llama_cpp

        buf = (llama_cpp.ctypes.c_uint8 * len(state.kv_bytes)).from_buffer_copy(state.kv_bytes)
        if llama_cpp.llama_state_set_data(self.llama._ctx.ctx, buf, len(state.kv_bytes)) == 0:
            raise EngineError("llama.cpp refused a saved session state")
        n = len(state.tokens)
        self.llama.input_ids[:n] = state.tokens
        self.llama.n_tokens = n
        self.llama._requires_eval = True


class LlamaEngine:
    """Serves generations from a pool of llama.cpp slots; see the module docstring."""

    simulated = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._slots = [_Slot(i, self._load(config)) for i in range(config.slots)]
        self._vocab = self._load(config, vocab_only=True)
        self._tokenize_cached = cached_llama_tokenizer(self._vocab)
        self._queue = SlotQueue(list(self._slots), config.max_queue)
        self._sessions = SessionCache(config.session_cache_bytes)
        # Monotonic counters, written by slot threads, read by metrics and heartbeats.
        self.generated_tokens = 0
        self.cancelled_generations = 0
        # Seconds slots spent serving requests (summed over slots): engine-seconds for
        # cost per token. A speculative request's wait for verification counts: it holds the slot.
        self.busy_seconds = 0.0

    @staticmethod
    def _load(config: EngineConfig, *, vocab_only: bool = False) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # an install without the edge extra
            raise EngineError(
                "llama-cpp-python is missing: pip install 'tandem-mesh[edge]'"
            ) from exc
        return Llama(
            model_path=str(config.model_path),
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads_batch,
            vocab_only=vocab_only,
            verbose=False,
        )

    # -- facts about the model ------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Context window in tokens."""
        return self.config.n_ctx

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return int(self._vocab.n_vocab())

    @property
    def token_cache(self) -> CachedTokenizer:
        """The prompt-piece cache ``tokenize`` goes through (hits, misses, size)."""
        return self._tokenize_cached

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in it (ChatML markers) are parsed.

        Blocking (about 1 ms per 2k tokens; messages seen before come from a cache):
        call it from a worker thread. It uses a vocab-only model, so it never touches
        a slot's context mid-generation.
        """
        return self._tokenize_cached(text)

    def perf_counters(self) -> dict[str, int]:
        """llama.cpp's own prompt/generation eval counters, summed over slots."""
        import llama_cpp

        totals = {"n_p_eval": 0, "n_eval": 0}
        for slot in self._slots:
            data = llama_cpp.llama_perf_context(slot.llama._ctx.ctx)
            totals["n_p_eval"] += data.n_p_eval
            totals["n_eval"] += data.n_eval
        return totals

    # -- load ----------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests holding a slot now."""
        return self._queue.running

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return self._queue.waiting

    @property
    def session_cache_bytes(self) -> int:
        """Bytes of saved session KV state."""
        return self._sessions.size_bytes

    # -- generation ----------------------------------------------------------

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Run one request; yields token events then one finish event.

        Closing the iterator early (a client disconnect) cancels the generation
        at the next token and frees the slot.
        """
        stats = GenerationStats(prompt_tokens=len(request.prompt_tokens))
        queued_at = time.perf_counter()
        slot = await self._queue.acquire()
        stats.queue_s = time.perf_counter() - queued_at
        events: asyncio.Queue[TokenEvent | FinishEvent | _ErrorEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: TokenEvent | FinishEvent | _ErrorEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = loop.run_in_executor(slot.thread, self._run, slot, request, stats, emit)
        try:
            while True:
                event = await events.get()
                if isinstance(event, _ErrorEvent):
                    raise EngineError(f"generation failed: {event.error}") from event.error
                yield event
                if isinstance(event, FinishEvent):
                    break
        finally:
            request.cancel.set()
            # The slot is released only after its thread is done with llama.cpp.
            await asyncio.shield(self._finish(slot, work))

    async def _finish(self, slot: _Slot, work: asyncio.Future[None]) -> None:
        try:
            await work
        finally:
            self._queue.release(slot)

    def _run(
        self,
        slot: _Slot,
        request: GenerationRequest,
        stats: GenerationStats,
        emit: Callable[[TokenEvent | FinishEvent | _ErrorEvent], None],
    ) -> None:
        """The slot thread's part: prefix reuse, then the token loop."""
        started = time.perf_counter()
        try:
            if request.cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            self._prepare_slot(slot, request)
            stats.cached_tokens = min(
                common_prefix_len(slot.tokens(), request.prompt_tokens),
                len(request.prompt_tokens) - 1,
            )
            loop = self._decode_loop if request.verifier is None else self._speculate_loop
            emit(FinishEvent(text=loop(slot, request, stats, emit), stats=stats))
        except BaseException as exc:  # surfaced on the event loop, never lost
            logger.exception("generation failed on slot %d", slot.index)
            slot.llama.reset()
            slot.session_key = None
            emit(_ErrorEvent(exc))
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _decode_loop(
        self,
        slot: _Slot,
        request: GenerationRequest,
        stats: GenerationStats,
        emit: Callable[[TokenEvent | FinishEvent | _ErrorEvent], None],
    ) -> str:

        llama = slot.llama
        params = request.sampling
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        assembler = TextAssembler(params.stop)
        # Absolute: a speculative answer that falls back here has produced tokens already.
        budget = stats.completion_tokens + min(
            params.max_tokens, self.n_ctx - len(request.prompt_tokens)
        )
        stats.finish_reason = "length"
        tokens = llama.generate(
            request.prompt_tokens,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=0,  # OpenAI semantics: no top-k, no min-p unless asked
            min_p=0.0,
            repeat_penalty=1.0,
        )
        watch = request.escalation
        for token in tokens:
            if request.cancel.is_set():
                stats.finish_reason = "cancelled"
                self.cancelled_generations += 1
                break
            if watch is not None and watch.observe(
                token_logprob(last_logits(llama), token), stats.completion_tokens
            ):
                stats.finish_reason = "escalate"  # the doubtful token is not emitted
                break
            reason = self._accept_token(slot, token, assembler, stats, emit, budget)
            if reason is not None:
                stats.finish_reason = reason
                break
        tokens.close()
        return assembler.finish()

    def _speculate_loop(
        self,
        slot: _Slot,
        request: GenerationRequest,
        stats: GenerationStats,
        emit: Callable[[TokenEvent | FinishEvent | _ErrorEvent], None],
    ) -> str:
        """Draft on llama.cpp, verify in the cloud, emit what the target confirms.

        Pipelined (see ``edge.drafter``): each round sends a draft, drafts the next
        block while the verdict is in flight, and keeps that block if the verdict
        confirms the guess it was built on.
        """
        assert request.verifier is not None
        llama, params = slot.llama, request.sampling
        assembler = TextAssembler(params.stop)
        budget = min(params.max_tokens, self.n_ctx - len(request.prompt_tokens))
        context = list(request.prompt_tokens)
        prefill(llama, context)
        pick = (
            greedy_pick
            if params.greedy
            else sampled_pick(params.temperature, params.top_p, params.seed)
        )
        length, timer = DraftLength(max_k=request.max_draft_tokens or 16), DraftTimer()
        draft = timer.draft(
            draft_block, llama, max(1, min(length.k, budget - 1)), self._is_eog, pick
        )
        while True:
            if request.cancel.is_set():
                stats.finish_reason = "cancelled"
                self.cancelled_generations += 1
                return assembler.finish()
            room = budget - stats.completion_tokens  # >= 1: the target adds one token
            pending, round_trip = self._send_for_verification(request.verifier, context, draft)
            limit = min(length.k + 1, room - len(draft) - 1)
            ahead = timer.draft(draft_ahead, llama, draft, limit, self._is_eog, pick, pending)
            try:
                accepted, next_token = self._checked(pending.result(), draft)
            except Exception as exc:
                if not request.fallback_to_edge:
                    raise
                logger.warning("verification failed (%s); finishing on the edge", exc)
                stats.fell_back = True
                rollback(llama, len(context), 0)
                rest = GenerationRequest(
                    context, replace(params, max_tokens=room), cancel=request.cancel
                )
                return assembler.finish() + self._decode_loop(slot, rest, stats, emit)
            stats.drafted += len(draft)
            stats.accepted += accepted
            stats.verify_rounds += 1
            length.update(len(draft), accepted, round_trip(), timer.token_s)
            kept = continues(draft, ahead, accepted, next_token)
            if not kept:
                rollback(llama, len(context), accepted)  # drops the block ahead too
            for token in [*draft.tokens[:accepted], next_token]:
                reason = self._accept_token(slot, token, assembler, stats, emit, budget)
                if reason is not None:
                    stats.finish_reason = reason
                    return assembler.finish()
                context.append(token)
            if kept and len(ahead) > 1:
                draft = ahead.after(1)  # drafted during the round trip; already evaluated
                stats.pipelined_rounds += 1
                continue
            if not kept:
                llama.eval([next_token])  # the next draft continues from the target's token
            k = max(1, min(length.k, budget - stats.completion_tokens - 1))
            draft = timer.draft(draft_block, llama, k, self._is_eog, pick)

    def _checked(self, verdict: tuple[int, int], draft: Draft) -> tuple[int, int]:
        """The verdict, if it can belong to this draft: a token outside the vocabulary
        would crash llama.cpp, so such a reply counts as a failed verification."""
        accepted, next_token = verdict
        if not (0 <= accepted <= len(draft) and 0 <= next_token < self.n_vocab):
            raise EngineError(f"verify reply out of range: {accepted} accepted, {next_token}")
        return accepted, next_token

    @staticmethod
    def _send_for_verification(
        verifier: Verifier, context: list[int], draft: Draft
    ) -> tuple[Future[tuple[int, int]], Callable[[], float]]:
        """Start a verification; also a function giving its round trip once it is done."""
        sent = time.perf_counter()
        arrived: list[float] = []
        pending = verifier(list(context), draft)
        pending.add_done_callback(lambda _: arrived.append(time.perf_counter()))
        return pending, lambda: (arrived[0] if arrived else time.perf_counter()) - sent

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, token))

    def _accept_token(
        self,
        slot: _Slot,
        token: int,
        assembler: TextAssembler,
        stats: GenerationStats,
        emit: Callable[[TokenEvent | FinishEvent | _ErrorEvent], None],
        budget: int,
    ) -> str | None:
        """Emit one generated token; the finish reason if generation must stop here."""
        if self._is_eog(token):
            return "stop"
        stats.completion_tokens += 1
        self.generated_tokens += 1
        emit(TokenEvent([token], assembler.push(slot.token_bytes(token))))
        if assembler.stopped:
            return "stop"
        if stats.completion_tokens >= budget:
            return "length"
        return None

    def _prepare_slot(self, slot: _Slot, request: GenerationRequest) -> None:
        """Save the slot's old conversation if replaced; restore a better saved prefix."""
        key = request.session_id
        if slot.session_key is not None and slot.session_key != key and slot.llama.n_tokens:
            self._sessions.put(slot.session_key, slot.save())
        have = common_prefix_len(slot.tokens(), request.prompt_tokens)
        match = self._sessions.best_match(request.prompt_tokens)
        if match is not None and match[2] >= have + _MIN_RESTORE_GAIN_TOKENS:
            saved_key, state, _ = match
            slot.restore(state)
            key = key or saved_key
        slot.session_key = key or f"anon-{uuid.uuid4().hex}"

    async def close(self) -> None:
        """Stop taking work, wait for running generations, free llama.cpp."""
        self._queue.close()
        for slot in self._slots:
            slot.thread.shutdown(wait=True)
            slot.llama.close()
        self._vocab.close()


class EdgeEngine(Protocol):
    """What the daemon needs of an engine: ``LlamaEngine``, or ``SimEngine`` for scale runs."""

    config: EngineConfig
    simulated: bool
    generated_tokens: int
    cancelled_generations: int
    busy_seconds: float

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def session_cache_bytes(self) -> int: ...
    @property
    def token_cache(self) -> CachedTokenizer: ...
    def tokenize(self, text: str) -> list[int]: ...
    def perf_counters(self) -> dict[str, int]: ...
    def generate(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]: ...
    async def close(self) -> None: ...
