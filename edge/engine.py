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
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.constraints import grammar_first, llama_grammar
from edge.errors import EngineError
from edge.escalation import last_logits
from edge.generation import (
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
)
from edge.sessions import SavedState, SessionCache, common_prefix_len
from edge.slot_queue import SlotQueue
from edge.text import TextAssembler
from mesh.protocol import TokenLogprob
from mesh.sampling import top_logprobs
from models.llama_loader import load_llama
from models.token_cache import CachedTokenizer, cached_llama_tokenizer
from models.vocab import llama_token_bytes

logger = logging.getLogger(__name__)

# Restoring a saved state costs a memcpy of its KV; only worth it for a real gain.
_MIN_RESTORE_GAIN_TOKENS = 8


@dataclass(frozen=True)
class _ErrorEvent:
    error: BaseException


Emit = Callable[[TokenEvent | FinishEvent | _ErrorEvent], None]


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


class ModelFacts:
    """What both llama.cpp engines (this slot engine, ``edge.batched_engine``) know of
    the model outside any context: a vocab-only model for tokenizing (so it never
    touches a context mid-generation), its cached tokenizer, token bytes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._vocab = LlamaEngine._load(config, vocab_only=True)
        self._tokenize_cached = cached_llama_tokenizer(self._vocab)
        self._loop_token_bytes = llama_token_bytes(self._vocab)  # its buffer: one thread

    @property
    def n_ctx(self) -> int:
        """Context window of one request in tokens."""
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
        call it from a worker thread.
        """
        return self._tokenize_cached(text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token id (answers' logprobs). Event-loop thread only."""
        return self._loop_token_bytes(token)


class LlamaEngine(ModelFacts):
    """Serves generations from a pool of llama.cpp slots; see the module docstring."""

    simulated = False

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._slots = [_Slot(i, self._load(config)) for i in range(config.slots)]
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
            import llama_cpp  # noqa: F401
        except ImportError as exc:  # an install without the edge extra
            raise EngineError(
                "llama-cpp-python is missing: pip install 'tandem-mesh[edge]'"
            ) from exc
        return load_llama(
            config.model_path,
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads_batch,
            vocab_only=vocab_only,
            verbose=False,
        )

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
        if request.sampling.constraint is not None:
            llama_grammar(request.sampling.constraint)  # a bad schema fails here, as a 400
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
        self, slot: _Slot, request: GenerationRequest, stats: GenerationStats, emit: Emit
    ) -> None:
        """The slot thread's part: prefix reuse, then the request's decode loop."""
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
            run = SlotRun(self, slot, request, stats, emit)
            text = request.decoder.run(run) if request.decoder else run.decode(request)
            emit(FinishEvent(text=text, stats=stats))
        except BaseException as exc:  # surfaced on the event loop, never lost
            logger.exception("generation failed on slot %d", slot.index)
            slot.llama.reset()
            slot.session_key = None
            emit(_ErrorEvent(exc))
        finally:
            self.busy_seconds += time.perf_counter() - started

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (end of turn or of text)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, token))

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


class SlotRun:
    """One request's turn on a slot, as a decode loop sees it (the slot's thread only).

    Plain decoding lives here; other decode loops (``GenerationRequest.decoder``,
    the speculative one) drive the same slot through ``accept`` and fall back to
    ``decode``.
    """

    def __init__(
        self,
        engine: LlamaEngine,
        slot: _Slot,
        request: GenerationRequest,
        stats: GenerationStats,
        emit: Emit,
    ) -> None:
        self.engine = engine
        self.llama = slot.llama
        self.request = request
        self.stats = stats
        self._slot = slot
        self._emit = emit

    @property
    def n_ctx(self) -> int:
        """The context window in tokens."""
        return self.engine.n_ctx

    @property
    def n_vocab(self) -> int:
        """The vocabulary size (token ids at or above it would crash llama.cpp)."""
        return self.engine.n_vocab

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""
        return self.engine.is_eog(token)

    def cancelled(self) -> bool:
        """True (and the stats say so) once the client went away."""
        if not self.request.cancel.is_set():
            return False
        self.stats.finish_reason = "cancelled"
        self.engine.cancelled_generations += 1
        return True

    def accept(
        self,
        token: int,
        assembler: TextAssembler,
        budget: int,
        logprob: TokenLogprob | None = None,
    ) -> str | None:
        """Emit one generated token; the finish reason if generation must stop here."""
        if self.is_eog(token):
            return "stop"
        self.stats.completion_tokens += 1
        self.engine.generated_tokens += 1
        text = assembler.push(self._slot.token_bytes(token))
        self._emit(TokenEvent([token], text, None if logprob is None else [logprob]))
        if assembler.stopped:
            return "stop"
        if self.stats.completion_tokens >= budget:
            return "length"
        return None

    def decode(self, request: GenerationRequest) -> str:
        """Plain decoding of ``request`` on this slot (also a speculative answer's
        fallback, with the tokens produced so far in its prompt)."""
        llama, params = self.llama, request.sampling
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        assembler = TextAssembler(params.stop)
        # Absolute: a speculative answer that falls back here has produced tokens already.
        budget = self.stats.completion_tokens + min(
            params.max_tokens, self.n_ctx - len(request.prompt_tokens)
        )
        self.stats.finish_reason = "length"
        grammar = llama_grammar(params.constraint) if params.constraint else None
        lazy = params.constraint is not None and params.constraint.lazy
        with grammar_first(llama, grammar, lazy=lazy) if grammar is not None else nullcontext():
            tokens = llama.generate(
                request.prompt_tokens,
                temp=params.temperature,
                top_p=params.top_p,
                top_k=0,  # OpenAI semantics: no top-k, no min-p unless asked
                min_p=0.0,
                repeat_penalty=1.0,
                grammar=None,  # a constraint samples through grammar_first's sampler
            )
            try:
                self._emit_tokens(request, tokens, assembler, budget)
            finally:
                tokens.close()
        return assembler.finish()

    def _emit_tokens(
        self, request: GenerationRequest, tokens: Any, assembler: TextAssembler, budget: int
    ) -> None:
        """Emit ``llama.generate``'s tokens (with logprobs, under the confidence watch)
        until one of them ends the answer."""
        watch, top_k = request.confidence, request.sampling.logprobs
        for token in tokens:
            if self.cancelled():
                return
            logprob = None
            if watch is not None or top_k is not None:
                # The logits this token was sampled from (the grammar does not touch them).
                chosen, ids, values = top_logprobs(last_logits(self.llama), token, top_k or 0)
                if top_k is not None:
                    logprob = TokenLogprob(logprob=chosen, top_ids=ids, top_logprobs=values)
                if watch is not None and watch.observe(chosen, self.stats.completion_tokens):
                    self.stats.finish_reason = "escalate"  # the doubtful token is not emitted
                    return
            reason = self.accept(token, assembler, budget, logprob)
            if reason is not None:
                self.stats.finish_reason = reason
                return
