"""The batched llama.cpp engine: many requests decoded together in one context.

``LlamaEngine`` gives each request a context of its own, so on one core N
concurrent requests take turns and add no throughput. This engine keeps one
llama.cpp context with ``sequences`` sequences (``n_seq_max``, one unified KV
cache of ``kv_tokens`` cells) and one scheduler thread that owns it. Each step
the scheduler

1. drops cancelled requests and admits waiting ones (FIFO) into free sequences,
   reusing the longest cached token prefix of any sequence: a returning
   conversation takes over its own idle sequence and evaluates only its new
   tokens; another request starting with the same tokens (a shared system
   prompt) gets them copied (``llama_memory_seq_cp``, the cells are shared);
2. builds one ``llama_batch``: the next token of every decoding sequence, then
   prompt chunks of newcomers (``prefill_chunk`` tokens each, at most one
   chunk's worth per step while others decode, so a long prompt never stalls
   the running streams for more than a chunk);
3. calls ``llama_decode`` once and samples each sequence whose logits came
   back with that request's own sampler (greedy argmax, or llama-cpp-python's
   chain seeded per request, grammar-first under an output constraint), then
   applies stop sequences, the token budget, the confidence watch (finish
   ``escalate``) exactly as the slot engine's ``SlotRun`` does.

A request reserves KV room for its prompt plus its token budget when admitted,
so a running stream never runs out of cache; idle sequences (kept for prefix
reuse) are evicted least recently used when room or a sequence is needed.

Not batched: the speculative route (``GenerationRequest.decoder``). Its drafter
drives a ``Llama`` context directly, so such requests go to a slot engine this
engine starts on first use (``slots`` contexts), as they would with
``engine: slots``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge.constraints import GrammarFirstSampler, llama_grammar
from edge.engine import LlamaEngine
from edge.errors import (
    ContextLengthError,
    EdgeError,
    EngineError,
    QueueFullError,
    ServiceUnavailableError,
)
from edge.generation import (
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
)
from edge.sessions import common_prefix_len
from edge.text import TextAssembler
from mesh.protocol import TokenLogprob
from mesh.sampling import top_logprobs
from models.llama_loader import load_llama
from models.token_cache import CachedTokenizer, cached_llama_tokenizer
from models.vocab import llama_token_bytes

logger = logging.getLogger(__name__)

# The Llama object only holds the weights and builds samplers; its own context stays idle.
_HOLDER_N_CTX = 256
_HOLDER_N_BATCH = 8


@dataclass(frozen=True)
class _ErrorEvent:
    error: BaseException


Emit = Callable[[TokenEvent | FinishEvent | _ErrorEvent], None]


@dataclass(eq=False)
class _Job:
    """One request inside the scheduler: its state between decode steps."""

    request: GenerationRequest
    stats: GenerationStats
    emit: Emit
    released: Callable[[], None]  # called once, when the scheduler is done with the job
    budget: int  # completion tokens it may produce
    submitted: float = field(default_factory=time.perf_counter)
    seq: _Sequence | None = None
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next
    decoding: bool = False  # the prompt is in the KV; ``pending`` is the last sampled token
    sampler: Any = None  # None: greedy argmax
    assembler: TextAssembler = field(init=False)

    def __post_init__(self) -> None:
        self.assembler = TextAssembler(self.request.sampling.stop)

    @property
    def reservation(self) -> int:
        """KV cells the job may come to hold: its prompt plus its token budget."""
        return len(self.request.prompt_tokens) + self.budget


@dataclass(eq=False)
class _Sequence:
    """One llama.cpp sequence id and the tokens whose KV it holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    job: _Job | None = None
    used_at: float = 0.0

    @property
    def cost(self) -> int:
        """KV cells counted against the cache: a running job's reservation."""
        return self.job.reservation if self.job is not None else len(self.tokens)


class _Batcher:
    """The context, its sequences and the scheduler thread (the only one touching them)."""

    def __init__(self, llama: Any, config: EngineConfig) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self.llama = llama
        self.n_ctx = config.n_ctx
        self.capacity = max(config.kv_tokens or 8 * config.n_ctx, config.n_ctx)
        self.prefill_chunk = config.prefill_chunk
        self.n_batch = max(config.n_batch, config.sequences + config.prefill_chunk)
        params = type(llama.context_params).from_buffer_copy(llama.context_params)
        params.n_ctx = self.capacity
        params.n_batch = params.n_ubatch = self.n_batch  # one step, one ubatch
        params.n_seq_max = config.sequences
        params.kv_unified = True  # one pool of cells; a shared prefix is stored once
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads_batch
        self.ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = int(llama.n_vocab())
        self.vocab = llama._model.vocab
        self.token_bytes = llama_token_bytes(llama)  # its buffer: this thread only
        self.sequences = [_Sequence(i) for i in range(config.sequences)]
        self.max_queue = config.max_queue
        self.inbox: deque[_Job] = deque()
        self.running: list[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self.generated_tokens = 0
        self.cancelled_generations = 0
        self.busy_seconds = 0.0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------

    def submit(self, job: _Job) -> None:
        """Queue a job for the scheduler; 429 past ``max_queue`` waiting, 503 when closing."""
        with self._cond:
            if self._closing:
                raise ServiceUnavailableError("the edge engine is shutting down")
            free = len(self.sequences) - len(self.running)
            if len(self.inbox) >= self.max_queue + max(0, free):
                raise QueueFullError(
                    f"the edge queue is full ({self.max_queue} requests waiting); retry shortly",
                    retry_after_s=1,
                )
            self.inbox.append(job)
            self._cond.notify()

    def wake(self) -> None:
        """Let an idle scheduler look again (a request was cancelled)."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Fail waiting jobs with 503, let running ones finish, stop the thread."""
        with self._cond:
            self._closing = True
            waiting, self.inbox = list(self.inbox), deque()
            self._cond.notify()
        for job in waiting:
            job.emit(_ErrorEvent(ServiceUnavailableError("the edge engine is shutting down")))
            job.released()
        self._thread.join()
        self._lib.llama_batch_free(self.batch)
        self.ctx.close()

    # -- the scheduler thread -----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.inbox and not self.running and not self._closing:
                    self._cond.wait()
                if self._closing and not self.running and not self.inbox:
                    return
            started = time.perf_counter()
            try:
                self._step()
            except BaseException as exc:  # never a dead scheduler: fail what ran, go on
                logger.exception("batched decode step failed")
                for job in list(self.running):
                    self._fail(job, exc)
            self.busy_seconds += time.perf_counter() - started

    def _step(self) -> None:
        """One scheduling round: cancellations, admissions, one ``llama_decode``, sampling."""
        for job in [j for j in self.running if j.request.cancel.is_set()]:
            self._cancel(job)
        self._admit()
        work = self._plan()
        if not work:
            if self.inbox and not self.running:
                time.sleep(0.001)  # only cancelled jobs raced in; they go next round
            return
        outputs = self._fill(work)
        rc = self._lib.llama_decode(self.ctx.ctx, self.batch)
        if rc == 1 and self._evict_idle():  # no free cells: should not happen (reservations)
            rc = self._lib.llama_decode(self.ctx.ctx, self.batch)
        if rc != 0:
            error = EngineError(f"llama_decode failed with status {rc}")
            for job, _ in work:
                self._forget(job.seq)
                self._fail(job, error)
            return
        self.steps += 1
        for job, n in work:
            seq = job.seq
            assert seq is not None
            seq.tokens.extend(job.pending[:n])
            job.pending = job.pending[n:]
        for job, index in outputs:
            try:
                self._sampled(job, index)
            except Exception as exc:  # one request's sampler failed; the others go on
                logger.exception("sampling failed")
                self._fail(job, exc)

    def _plan(self) -> list[tuple[_Job, int]]:
        """Which jobs evaluate how many of their pending tokens this step."""
        work = [(job, 1) for job in self.running if job.decoding]
        # While streams decode, newcomers' prompts share one chunk per step.
        budget = self.prefill_chunk if work else self.n_batch - len(work)
        first = True
        for job in self.running:
            if job.decoding or not job.pending:
                continue
            n = min(self.prefill_chunk, len(job.pending))
            if n > budget and not first:
                break
            work.append((job, n))
            budget -= n
            first = False
            if budget <= 0:
                break
        return work

    def _fill(self, work: list[tuple[_Job, int]]) -> list[tuple[_Job, int]]:
        """Write the step into the batch; the jobs whose logits come back, at which index."""
        batch, outputs, i = self.batch, [], 0
        for job, n in work:
            seq = job.seq
            assert seq is not None
            last = n == len(job.pending)  # the prompt's end, or a decoding token
            for j in range(n):
                batch.token[i] = job.pending[j]
                batch.pos[i] = len(seq.tokens) + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq.seq_id
                batch.logits[i] = last and j == n - 1
                i += 1
            if last:
                outputs.append((job, i - 1))
        batch.n_tokens = i
        return outputs

    def _sampled(self, job: _Job, index: int) -> None:
        """Pick the job's next token from the logits at ``index``; emit it or finish."""
        logits = np.ctypeslib.as_array(
            self._lib.llama_get_logits_ith(self.ctx.ctx, index), shape=(self.n_vocab,)
        )
        token = int(logits.argmax()) if job.sampler is None else job.sampler.sample(self.ctx, index)
        job.decoding = True
        if job.request.cancel.is_set():
            self._cancel(job)
            return
        stats, params, watch = job.stats, job.request.sampling, job.request.confidence
        logprob = None
        if watch is not None or params.logprobs is not None:
            chosen, ids, values = top_logprobs(logits, token, params.logprobs or 0)
            if params.logprobs is not None:
                logprob = TokenLogprob(logprob=chosen, top_ids=ids, top_logprobs=values)
            if watch is not None and watch.observe(chosen, stats.completion_tokens):
                self._finish(job, "escalate")  # the doubtful token is not emitted
                return
        if self._lib.llama_vocab_is_eog(self.vocab, token):
            self._finish(job, "stop")
            return
        stats.completion_tokens += 1
        self.generated_tokens += 1
        text = job.assembler.push(self.token_bytes(token))
        job.emit(TokenEvent([token], text, None if logprob is None else [logprob]))
        if job.assembler.stopped:
            self._finish(job, "stop")
        elif stats.completion_tokens >= job.budget:
            self._finish(job, "length")
        else:
            job.pending = [token]

    # -- admission and sequences --------------------------------------------------

    def _admit(self) -> None:
        """Move waiting jobs into sequences, first come first served, while they fit."""
        while True:
            with self._cond:
                if not self.inbox:
                    return
                job = self.inbox[0]
                if job.request.cancel.is_set():
                    self.inbox.popleft()
                    placed = None
                else:
                    placed = self._place(job)
                    if placed is None:
                        return  # no sequence or no room yet: wait for a running job
                    self.inbox.popleft()
                    self.running.append(job)
            if placed is None:
                job.stats.finish_reason = "cancelled"
                self.cancelled_generations += 1
                job.emit(FinishEvent(text="", stats=job.stats))
                job.released()
                continue
            self._start(job, *placed)

    def _place(self, job: _Job) -> tuple[_Sequence, int, _Sequence | None] | None:
        """A sequence for ``job``, how many prompt tokens it already has, and the
        sequence to copy them from (None: they are the target's own)."""
        prompt = job.request.prompt_tokens
        idle = [s for s in self.sequences if s.job is None]
        if not idle:
            return None
        # The longest cached prefix (at least one prompt token is left to evaluate, for
        # its logits); on a tie an idle sequence, which the job can take over.
        reuse = {
            s.seq_id: min(common_prefix_len(s.tokens, prompt), len(prompt) - 1)
            for s in self.sequences
        }
        source = max(self.sequences, key=lambda s: (reuse[s.seq_id], s.job is None))
        keep = reuse[source.seq_id]
        empty = [s for s in idle if not s.tokens]
        if source.job is None and (keep == len(source.tokens) or (keep > 0 and not empty)):
            # A returning conversation resumes its own sequence (or no sequence is empty).
            target, copy_from = source, None
        else:
            # Copy the shared prefix into a fresh sequence; the source keeps its tokens.
            copy_from = source if keep > 0 else None
            target = (
                empty[0]
                if empty
                else min((s for s in idle if s is not copy_from), key=lambda s: s.used_at)
            )
        if not self._make_room(job.reservation, keep=(target, copy_from)):
            return None
        return target, keep, copy_from

    def _make_room(self, need: int, keep: tuple[_Sequence | None, ...]) -> bool:
        """Evict idle sequences (least recently used first) until ``need`` cells fit."""
        used = sum(s.cost for s in self.sequences if s is not keep[0])
        victims = sorted(
            (s for s in self.sequences if s.job is None and s.tokens and s not in keep),
            key=lambda s: s.used_at,
        )
        while used + need > self.capacity:
            if not victims:
                return False
            victim = victims.pop(0)
            used -= len(victim.tokens)
            self._forget(victim)
        return True

    def _evict_idle(self) -> bool:
        """Drop every idle sequence's KV; whether anything was dropped."""
        idle = [s for s in self.sequences if s.job is None and s.tokens]
        for seq in idle:
            self._forget(seq)
        return bool(idle)

    def _forget(self, seq: _Sequence | None) -> None:
        if seq is not None:
            self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
            seq.tokens = []

    def _start(self, job: _Job, seq: _Sequence, keep: int, source: _Sequence | None) -> None:
        """Bring ``seq`` to the job's first ``keep`` prompt tokens and queue the rest."""
        prompt = job.request.prompt_tokens
        if source is None:
            self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, keep, -1)
            seq.tokens = seq.tokens[:keep]
        else:
            self._forget(seq)
            self._lib.llama_memory_seq_cp(self.memory, source.seq_id, seq.seq_id, 0, keep)
            seq.tokens = list(prompt[:keep])
        seq.job, job.seq = job, seq
        job.pending = list(prompt[keep:])
        job.stats.cached_tokens = keep
        job.stats.queue_s = time.perf_counter() - job.submitted
        job.sampler = self._sampler(job.request)
        if job.budget <= 0:
            self._finish(job, "length")

    def _sampler(self, request: GenerationRequest) -> Any:
        """The request's sampler: None for plain greedy (argmax), else llama-cpp-python's
        chain as the slot engine's ``generate`` builds it, grammar-first if constrained."""
        params = request.sampling
        if params.greedy and params.constraint is None:
            return None
        self.llama.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        chain = self.llama._init_sampler(
            temp=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0
        )
        if params.constraint is None:
            return chain
        grammar = llama_grammar(params.constraint)
        return GrammarFirstSampler(
            self.llama, chain, grammar, greedy=params.greedy, lazy=params.constraint.lazy
        )

    # -- the end of a job ---------------------------------------------------------

    def _finish(self, job: _Job, reason: str) -> None:
        job.stats.finish_reason = reason
        job.emit(FinishEvent(text=job.assembler.finish(), stats=job.stats))
        self._release(job)

    def _cancel(self, job: _Job) -> None:
        self.cancelled_generations += 1
        self._finish(job, "cancelled")

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._forget(job.seq)  # its KV may be half written
        job.emit(_ErrorEvent(error))
        self._release(job)

    def _release(self, job: _Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if job.seq is not None:
            job.seq.job = None
            job.seq.used_at = time.monotonic()
        with self._cond:
            if job in self.running:
                self.running.remove(job)
        job.released()


class BatchedEngine:
    """Serves generations by continuous batching in one llama.cpp context; see the
    module docstring. The same interface as ``LlamaEngine``."""

    simulated = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llama = self._load(config)
        self._vocab = LlamaEngine._load(config, vocab_only=True)
        self._tokenize_cached = cached_llama_tokenizer(self._vocab)
        self._loop_token_bytes = llama_token_bytes(self._vocab)  # its buffer: one thread
        self._batcher = _Batcher(self._llama, config)
        self._slot_engine: LlamaEngine | None = None  # the speculative route's, on first use
        self._slot_lock = asyncio.Lock()

    @staticmethod
    def _load(config: EngineConfig) -> Any:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:  # an install without the edge extra
            raise EngineError(
                "llama-cpp-python is missing: pip install 'tandem-mesh[edge]'"
            ) from exc
        return load_llama(
            config.model_path,
            n_ctx=_HOLDER_N_CTX,
            n_batch=_HOLDER_N_BATCH,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads_batch,
            verbose=False,
        )

    # -- facts about the model ------------------------------------------------

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
        """Token ids of ``text``, special tokens parsed (blocking: a worker thread)."""
        return self._tokenize_cached(text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token id (answers' logprobs). Event-loop thread only."""
        return self._loop_token_bytes(token)

    def perf_counters(self) -> dict[str, int]:
        """llama.cpp's own prompt/generation eval counters (a batched step of several
        sequences counts as prompt evaluation), plus the slot path's."""
        import llama_cpp

        data = llama_cpp.llama_perf_context(self._batcher.ctx.ctx)
        totals = {"n_p_eval": int(data.n_p_eval), "n_eval": int(data.n_eval)}
        if self._slot_engine is not None:
            for key, value in self._slot_engine.perf_counters().items():
                totals[key] += value
        return totals

    # -- load ----------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests generating now."""
        slots = self._slot_engine.running if self._slot_engine else 0
        return len(self._batcher.running) + slots

    @property
    def waiting(self) -> int:
        """Requests waiting for a sequence (or the speculative route's slot)."""
        slots = self._slot_engine.waiting if self._slot_engine else 0
        return len(self._batcher.inbox) + slots

    @property
    def session_cache_bytes(self) -> int:
        """Bytes of the slot path's saved states (idle sequences' KV stays in the cache)."""
        return self._slot_engine.session_cache_bytes if self._slot_engine else 0

    @property
    def generated_tokens(self) -> int:
        """Tokens emitted by all requests."""
        slots = self._slot_engine.generated_tokens if self._slot_engine else 0
        return self._batcher.generated_tokens + slots

    @property
    def cancelled_generations(self) -> int:
        """Requests that ended because their client went away."""
        slots = self._slot_engine.cancelled_generations if self._slot_engine else 0
        return self._batcher.cancelled_generations + slots

    @property
    def busy_seconds(self) -> float:
        """Seconds the context spent on decode steps (one core), plus slot-seconds."""
        slots = self._slot_engine.busy_seconds if self._slot_engine else 0.0
        return self._batcher.busy_seconds + slots

    @property
    def decode_steps(self) -> int:
        """``llama_decode`` calls the scheduler made (tests read batching from it)."""
        return self._batcher.steps

    # -- generation ----------------------------------------------------------

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Run one request; yields token events then one finish event.

        Closing the iterator early (a client disconnect) cancels the request before
        the next decode step and frees its sequence.
        """
        if request.decoder is not None:
            engine = await self._slot_path()
            async for relayed in engine.generate(request):
                yield relayed
            return
        prompt = request.prompt_tokens
        if not prompt or len(prompt) >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this edge's window is {self.n_ctx}"
            )
        if request.sampling.constraint is not None:
            llama_grammar(request.sampling.constraint)  # a bad schema fails here, as a 400
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | FinishEvent | _ErrorEvent] = asyncio.Queue()
        released: asyncio.Future[None] = loop.create_future()

        def emit(event: TokenEvent | FinishEvent | _ErrorEvent) -> None:
            _call_soon(loop, events.put_nowait, event)

        def release() -> None:
            _call_soon(loop, _resolve, released)

        budget = min(request.sampling.max_tokens, self.n_ctx - len(prompt))
        stats = GenerationStats(prompt_tokens=len(prompt))
        self._batcher.submit(_Job(request, stats, emit, release, budget))
        try:
            while True:
                event = await events.get()
                if isinstance(event, _ErrorEvent):
                    if isinstance(event.error, EdgeError):
                        raise event.error
                    raise EngineError(f"generation failed: {event.error}") from event.error
                yield event
                if isinstance(event, FinishEvent):
                    break
        finally:
            request.cancel.set()
            self._batcher.wake()
            # The request's KV and sampler are released by the scheduler thread only.
            await asyncio.shield(released)

    async def _slot_path(self) -> LlamaEngine:
        """The slot engine the speculative route runs on, loaded on first use."""
        async with self._slot_lock:
            if self._slot_engine is None:
                config = replace(self.config, batched=False)
                self._slot_engine = await asyncio.to_thread(LlamaEngine, config)
            return self._slot_engine

    async def close(self) -> None:
        """Stop taking work, let running generations finish, free llama.cpp."""
        await asyncio.to_thread(self._batcher.close)
        if self._slot_engine is not None:
            await self._slot_engine.close()
        self._llama.close()
        self._vocab.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Hand ``callback`` to the event loop; a loop already closed has nobody to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
