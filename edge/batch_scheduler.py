"""The batched engine's scheduler: one llama.cpp context, many sequences, one thread.

``BatchScheduler`` owns a context with ``sequences`` sequences (``n_seq_max``,
one unified KV cache of ``kv_tokens`` cells) and the only thread that touches
it. Each step it

1. drops cancelled jobs and admits waiting ones (FIFO) into free sequences,
   reusing the longest cached token prefix of any sequence: a returning
   conversation takes over its own idle sequence and evaluates only its new
   tokens; another job starting with the same tokens (a shared system prompt)
   gets them copied (``llama_memory_seq_cp``; the cells are shared), and when
   those tokens are still being prefilled for a job admitted before it, it waits
   for that prefill (letting the jobs behind it go first) and copies them then;
2. builds one ``llama_batch``: the next token of every decoding sequence, then
   prompt chunks of newcomers (``prefill_chunk`` tokens each, one chunk's worth
   per step while others decode, so a long prompt never stalls the running
   streams for more than a chunk);
3. calls ``llama_decode`` once, samples each job whose logits came back with
   that job's own sampler (greedy argmax, or llama-cpp-python's chain seeded per
   request, grammar-first under an output constraint) and applies stop
   sequences, the token budget and the confidence watch as ``SlotRun`` does.

Jobs *driven* by a decode loop in another thread (the speculative route's
drafter, through ``edge.batched_engine.SequenceRun``) are not sampled here: their
thread hands over tokens to evaluate (``evaluate``), and the step that evaluates
them hands back the last token's logits. So the draft steps of concurrent
speculative sessions share decode steps with each other and with plain streams.

A job reserves KV cells for its prompt plus its token budget when admitted, so a
running stream never runs out of cache; idle sequences (kept for prefix reuse)
are evicted least recently used when cells or a sequence are needed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.constraints import GrammarFirstSampler, llama_grammar
from edge.errors import EngineError, QueueFullError, ServiceUnavailableError
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
from models.vocab import llama_token_bytes

logger = logging.getLogger(__name__)

# How long an idle scheduler with blocked work (a full cache) waits before looking again.
_RECHECK_S = 0.05

# A newcomer whose prompt shares at least this many more tokens with a prompt still
# being prefilled than with anything cached waits for that prefill and copies its
# cells, rather than evaluating the same tokens in the same step: agent sessions that
# start together share a system prompt and tool definitions.
MIN_SHARED_PREFILL = 16


@dataclass(frozen=True)
class ErrorEvent:
    """A job failed; the event loop raises ``error``."""

    error: BaseException


Emit = Callable[[TokenEvent | FinishEvent | ErrorEvent], None]


class CancelledJob(Exception):
    """The job was cancelled while its driving thread waited for an evaluation."""


@dataclass(eq=False)
class Job:
    """One request inside the scheduler: its state between decode steps."""

    request: GenerationRequest
    stats: GenerationStats
    emit: Emit
    released: Callable[[], None]  # called once, when the scheduler is done with the job
    budget: int  # completion tokens it may produce (absolute: counts tokens already emitted)
    driven: bool = False  # a decode loop in another thread drives it (speculative route)
    submitted: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next
    decoding: bool = False  # the prompt is in the KV; ``pending`` is the last sampled token
    sampler: Any = None  # None: greedy argmax
    assembler: TextAssembler = field(init=False)
    # Driven jobs: the thread's side of the hand-over.
    admitted: threading.Event = field(default_factory=threading.Event)
    evaluated: threading.Event = field(default_factory=threading.Event)
    truncate_to: int | None = None  # drop KV past this before evaluating ``pending``
    logits: np.ndarray | None = None  # after the last token of ``pending`` was evaluated
    error: BaseException | None = None
    handover: GenerationRequest | None = None  # plain decoding from here (a fallback)
    handover_text: str = ""
    done: bool = False  # the driving thread is finished with the job
    cancel_seen: bool = False

    def __post_init__(self) -> None:
        self.assembler = TextAssembler(self.request.sampling.stop)

    @property
    def reservation(self) -> int:
        """KV cells the job may come to hold: its prompt plus its token budget."""
        return len(self.request.prompt_tokens) + self.budget

    @property
    def needs_step(self) -> bool:
        """Whether the scheduler has something to do for this job."""
        cancelled = self.request.cancel.is_set() and not self.cancel_seen
        handing_over = self.handover is not None and self.sampler is None and not self.decoding
        return bool(self.pending) or self.done or cancelled or handing_over


@dataclass(eq=False)
class Sequence:
    """One llama.cpp sequence id and the tokens whose KV it holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    job: Job | None = None
    used_at: float = 0.0

    @property
    def cost(self) -> int:
        """KV cells counted against the cache: a running job's reservation."""
        return self.job.reservation if self.job is not None else len(self.tokens)


class BatchScheduler:
    """The context, its sequences and the scheduler thread; see the module docstring."""

    def __init__(self, llama: Any, config: EngineConfig) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._lib = llama_cpp
        self.llama = llama  # holds the weights and builds samplers (this thread only)
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
        self.sequences = [Sequence(i) for i in range(config.sequences)]
        self.max_queue = config.max_queue
        self.inbox: deque[Job] = deque()
        self.running: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self.generated_tokens = 0
        self.cancelled_generations = 0
        self.busy_seconds = 0.0
        self.steps = 0  # llama_decode calls
        self.stepped_sequences = 0  # summed over steps: sequences each step evaluated
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (any thread: reads the vocabulary only)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    # -- other threads' side ------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; 429 past ``max_queue`` waiting, 503 when closing."""
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

    def evaluate(self, job: Job, keep: int, tokens: list[int]) -> np.ndarray:
        """A driven job's thread: evaluate ``tokens`` after the first ``keep`` of its
        sequence; blocks until a step did, and returns the last token's logits."""
        with self._cond:
            self._raise_if_stopped(job)
            job.truncate_to, job.pending = keep, list(tokens)
            job.evaluated.clear()
            self._cond.notify()
        job.evaluated.wait()
        self._raise_if_stopped(job)
        assert job.logits is not None
        return job.logits

    def decode_plainly(self, job: Job, rest: GenerationRequest, keep: int) -> str:
        """A driven job's thread: hand the job to plain decoding of ``rest`` (the
        sequence holds its first ``keep`` tokens); blocks until it ends, returns the text
        not yet emitted."""
        with self._cond:
            self._raise_if_stopped(job)
            job.truncate_to, job.handover = keep, rest
            job.evaluated.clear()
            self._cond.notify()
        job.evaluated.wait()
        self._raise_if_stopped(job)
        return job.handover_text

    def finished_driving(self, job: Job) -> None:
        """A driven job's thread is done with it: release its sequence."""
        with self._cond:
            job.done = True
            self._cond.notify()

    def _raise_if_stopped(self, job: Job) -> None:
        if job.error is not None:
            raise job.error
        if job.cancel_seen:
            raise CancelledJob

    def close(self) -> None:
        """Fail waiting jobs with 503, let running ones finish, stop the thread."""
        with self._cond:
            self._closing = True
            waiting, self.inbox = list(self.inbox), deque()
            self._cond.notify()
        for job in waiting:
            job.emit(ErrorEvent(ServiceUnavailableError("the edge engine is shutting down")))
            job.admitted.set()
            job.released()
        self._thread.join()
        self._lib.llama_batch_free(self.batch)
        self.ctx.close()

    # -- the scheduler thread -----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._has_work():
                    self._cond.wait(_RECHECK_S if self.inbox else None)
                if self._closing and not self.running and not self.inbox:
                    return
            started = time.perf_counter()
            try:
                worked = self._step()
            except BaseException as exc:  # never a dead scheduler: fail what ran, go on
                logger.exception("batched decode step failed")
                for job in list(self.running):
                    self._fail(job, exc)
                worked = True
            if worked:
                self.busy_seconds += time.perf_counter() - started
            else:
                with self._cond:  # blocked (no room yet): wait for a change, not a spin
                    self._cond.wait(_RECHECK_S)

    def _has_work(self) -> bool:
        if self._closing and not self.running:
            return True
        return bool(self.inbox) or any(job.needs_step for job in self.running)

    def _step(self) -> bool:
        """One round: cancellations, admissions, one ``llama_decode``, sampling."""
        for job in list(self.running):
            if job.done:
                self._release(job)
            elif job.request.cancel.is_set() and not job.cancel_seen:
                self._cancel(job)
        self._admit()
        with self._cond:  # driven jobs' threads write their requests under the lock
            for job in self.running:
                self._apply_requests(job)
            work = self._plan()
        if not work:
            return False
        outputs = self._fill(work)
        rc = self._lib.llama_decode(self.ctx.ctx, self.batch)
        if rc == 1 and self._evict_idle():  # no free cells: should not happen (reservations)
            rc = self._lib.llama_decode(self.ctx.ctx, self.batch)
        if rc != 0:
            error = EngineError(f"llama_decode failed with status {rc}")
            for job, _ in work:
                self._fail(job, error)
            return True
        self.steps += 1
        self.stepped_sequences += len(work)
        for job, n in work:
            assert job.seq is not None
            job.seq.tokens.extend(job.pending[:n])
            job.pending = job.pending[n:]
        for job, index in outputs:
            try:
                if job.driven and job.handover is None:
                    job.logits = self._logits(index).copy()
                    job.evaluated.set()
                else:
                    self._sampled(job, index)
            except Exception as exc:  # one request's sampler failed; the others go on
                logger.exception("sampling failed")
                self._fail(job, exc)
        return True

    def _apply_requests(self, job: Job) -> None:
        """Apply a driven job's truncation and, once, set up its hand-over to plain decoding."""
        seq = job.seq
        if seq is None:
            return
        if job.truncate_to is not None:
            if len(seq.tokens) > job.truncate_to:
                self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, job.truncate_to, -1)
                del seq.tokens[job.truncate_to :]
            job.truncate_to = None
        rest = job.handover
        if rest is not None and job.sampler is None and not job.decoding:
            prompt = rest.prompt_tokens
            keep = min(common_prefix_len(seq.tokens, prompt), len(prompt) - 1)
            self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, keep, -1)
            del seq.tokens[keep:]
            job.pending = list(prompt[keep:])
            job.budget = job.stats.completion_tokens + min(
                rest.sampling.max_tokens, self.n_ctx - len(prompt)
            )
            job.assembler = TextAssembler(rest.sampling.stop)
            job.sampler = self._sampler(rest) or _GREEDY

    def _plan(self) -> list[tuple[Job, int]]:
        """Which jobs evaluate how many of their pending tokens this step."""
        work = [(job, 1) for job in self.running if len(job.pending) == 1 and job.seq]
        # While streams decode, newcomers' prompts share one chunk per step.
        budget = self.prefill_chunk if work else self.n_batch
        first = True
        for job in self.running:
            if len(job.pending) <= 1 or job.seq is None:
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

    def _fill(self, work: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
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

    def _logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(
            self._lib.llama_get_logits_ith(self.ctx.ctx, index), shape=(self.n_vocab,)
        )

    def _sampled(self, job: Job, index: int) -> None:
        """Pick the job's next token from the logits at ``index``; emit it or finish."""
        logits = self._logits(index)
        sampler = job.sampler
        token = (
            int(logits.argmax())
            if sampler is None or sampler is _GREEDY
            else sampler.sample(self.ctx, index)
        )
        job.decoding = True
        if job.request.cancel.is_set():
            self._cancel(job)
            return
        stats, params = job.stats, (job.handover or job.request).sampling
        watch = None if job.driven else job.request.confidence
        logprob = None
        if watch is not None or params.logprobs is not None:
            chosen, ids, values = top_logprobs(logits, token, params.logprobs or 0)
            if params.logprobs is not None:
                logprob = TokenLogprob(logprob=chosen, top_ids=ids, top_logprobs=values)
            if watch is not None and watch.observe(chosen, stats.completion_tokens):
                self._finish(job, "escalate")  # the doubtful token is not emitted
                return
        if self.is_eog(token):
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
        """Move waiting jobs into sequences, first come first served, while they fit; a
        job waiting for another's prefill of their shared prefix lets the next go first."""
        skipped = 0
        while True:
            with self._cond:
                if len(self.inbox) <= skipped:
                    return
                job = self.inbox[skipped]
                cancelled = job.request.cancel.is_set()
                placed = None if cancelled else self._place(job)
                if isinstance(placed, _AfterPrefill):
                    skipped += 1
                    continue
                if placed is None and not cancelled:
                    return  # no sequence or no room yet: wait for a running job
                del self.inbox[skipped]
                if placed is not None:
                    self.running.append(job)
            if placed is None:
                job.stats.finish_reason = "cancelled"
                self.cancelled_generations += 1
                job.cancel_seen = True
                job.emit(FinishEvent(text="", stats=job.stats))
                job.admitted.set()
                job.released()
                continue
            self._start(job, *placed)

    def _place(self, job: Job) -> tuple[Sequence, int, Sequence | None] | _AfterPrefill | None:
        """A sequence for ``job``, how many prompt tokens it already has, and the
        sequence to copy them from (None: they are the target's own); ``_AFTER_PREFILL``
        when a longer shared prefix is being prefilled now; None when nothing fits."""
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
        if self._prefilling_prefix(prompt) >= keep + MIN_SHARED_PREFILL:
            return _AFTER_PREFILL
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

    def _prefilling_prefix(self, prompt: list[int]) -> int:
        """The longest prefix ``prompt`` shares with a running job's prompt still being
        prefilled (what that job's sequence will hold after its prefill)."""
        shared = 0
        for other in self.running:
            if other.driven or other.decoding or len(other.pending) <= 1 or other.seq is None:
                continue
            common = common_prefix_len(other.request.prompt_tokens, prompt)
            shared = max(shared, min(common, len(prompt) - 1))
        return shared

    def _make_room(self, need: int, keep: tuple[Sequence | None, ...]) -> bool:
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

    def _forget(self, seq: Sequence | None) -> None:
        if seq is not None:
            self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
            seq.tokens = []

    def _start(self, job: Job, seq: Sequence, keep: int, source: Sequence | None) -> None:
        """Bring ``seq`` to the job's first ``keep`` prompt tokens and queue the rest
        (a driven job's thread evaluates them itself)."""
        prompt = job.request.prompt_tokens
        if source is None:
            self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, keep, -1)
            seq.tokens = seq.tokens[:keep]
        else:
            self._forget(seq)
            self._lib.llama_memory_seq_cp(self.memory, source.seq_id, seq.seq_id, 0, keep)
            seq.tokens = list(prompt[:keep])
        seq.job, job.seq = job, seq
        job.stats.cached_tokens = keep
        job.stats.queue_s = time.perf_counter() - job.submitted
        if job.driven:
            job.admitted.set()
            return
        job.pending = list(prompt[keep:])
        try:
            job.sampler = self._sampler(job.request)
        except Exception as exc:  # this request's sampler only; the batch goes on
            logger.exception("building a sampler failed")
            self._fail(job, exc)
            return
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

    def _finish(self, job: Job, reason: str) -> None:
        job.stats.finish_reason = reason
        if job.driven:  # its thread emits the finish event, then lets go
            with self._cond:
                job.handover_text = job.assembler.finish()
                job.pending = []
                job.evaluated.set()
            return
        job.emit(FinishEvent(text=job.assembler.finish(), stats=job.stats))
        self._release(job)

    def _cancel(self, job: Job) -> None:
        self.cancelled_generations += 1
        job.cancel_seen = True
        if job.driven:
            with self._cond:
                job.stats.finish_reason = "cancelled"
                job.pending = []
                job.evaluated.set()  # a thread waiting for an evaluation learns it at once
            return
        self._finish(job, "cancelled")

    def _fail(self, job: Job, error: BaseException) -> None:
        self._forget(job.seq)  # its KV may be half written
        if job.driven:
            with self._cond:
                job.error, job.pending = error, []
                job.evaluated.set()
            return
        job.emit(ErrorEvent(error))
        self._release(job)

    def _release(self, job: Job) -> None:
        if job.sampler is not None and job.sampler is not _GREEDY:
            job.sampler.close()
        job.sampler = None
        if job.seq is not None:
            job.seq.job = None
            job.seq.used_at = time.monotonic()
        with self._cond:
            if job in self.running:
                self.running.remove(job)
        job.released()


# A handed-over greedy job's sampler: argmax, marked so the hand-over is set up once.
_GREEDY = object()


class _AfterPrefill:
    """``_place``'s answer for a job that waits for a running job's prefill of their
    shared prefix."""


_AFTER_PREFILL = _AfterPrefill()
