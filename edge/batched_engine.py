"""The batched llama.cpp engine: many requests decoded together in one context.

``LlamaEngine`` gives each request a context of its own, so on one core N
concurrent requests take turns and add no throughput. This engine puts them all
in one context as sequences of one batch, stepped by ``BatchScheduler``
(``edge.batch_scheduler``: continuous batching, chunked prefill, per-sequence
sampling, prefix reuse), and offers ``edge/serving.py`` the slot engine's
interface.

The speculative route's decode loop (``SpeculativeDecoder``) is batched too: it
runs in a thread of its own per request on a ``SequenceRun``, whose
``SequenceLlama`` answers the drafter's ``eval`` / ``n_tokens`` / logits calls by
handing the tokens to the scheduler, so the draft steps of concurrent
speculative sessions (and the block drafted ahead during a verification round
trip) share decode steps with each other and with plain streams. A fallback to
plain decoding hands the sequence back to the scheduler's own sampling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

import numpy as np

from edge.batch_scheduler import BatchScheduler, CancelledJob, ErrorEvent, Job
from edge.constraints import llama_grammar
from edge.engine import ModelFacts
from edge.errors import ContextLengthError, EdgeError, EngineError
from edge.generation import (
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
)
from edge.text import TextAssembler
from mesh.protocol import TokenLogprob
from models.llama_loader import load_llama
from models.vocab import llama_token_bytes

logger = logging.getLogger(__name__)

# The Llama object only holds the weights and builds samplers; its own context stays idle.
_HOLDER_N_CTX = 256
_HOLDER_N_BATCH = 8


class SequenceLlama:
    """The part of ``llama_cpp.Llama`` the drafter uses, over one batched sequence.

    ``eval`` hands the tokens to the scheduler and blocks until a decode step has
    evaluated them; setting ``n_tokens`` lower drops the KV past it before the next
    ``eval``, as ``Llama`` does. The driving thread only."""

    def __init__(self, scheduler: BatchScheduler, job: Job) -> None:
        assert job.seq is not None
        self._scheduler, self._job = scheduler, job
        self.n_tokens = len(job.seq.tokens)
        self._logits: np.ndarray | None = None
        self._requires_eval = False  # written by the drafter's rollback; nothing to do here

    @property
    def _input_ids(self) -> np.ndarray:
        assert self._job.seq is not None
        return np.asarray(self._job.seq.tokens[: self.n_tokens], dtype=np.intc)

    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self._scheduler.n_vocab

    def eval(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` after the first ``n_tokens`` (in some decode step)."""
        self._logits = self._scheduler.evaluate(self._job, self.n_tokens, list(tokens))
        self.n_tokens += len(tokens)

    def last_logits(self) -> np.ndarray:
        """The logits after the last evaluated token."""
        assert self._logits is not None, "nothing evaluated yet"
        return self._logits


class SequenceRun:
    """One request's turn on a batched sequence, as a decode loop sees it: the same
    members as ``edge.engine.SlotRun`` (``llama``, ``accept``, ``decode``, ...)."""

    def __init__(self, scheduler: BatchScheduler, job: Job, n_ctx: int) -> None:
        self.llama = SequenceLlama(scheduler, job)
        self.request, self.stats = job.request, job.stats
        self.n_ctx, self.n_vocab = n_ctx, scheduler.n_vocab
        self._scheduler, self._job = scheduler, job
        self._token_bytes = llama_token_bytes(scheduler.llama)  # this thread's buffer

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""
        return self._scheduler.is_eog(token)

    def cancelled(self) -> bool:
        """True (and the stats say so) once the client went away."""
        if not self.request.cancel.is_set():
            return False
        self.stats.finish_reason = "cancelled"
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
        self._scheduler.generated_tokens += 1
        text = assembler.push(self._token_bytes(token))
        self._job.emit(TokenEvent([token], text, None if logprob is None else [logprob]))
        if assembler.stopped:
            return "stop"
        if self.stats.completion_tokens >= budget:
            return "length"
        return None

    def decode(self, request: GenerationRequest) -> str:
        """Plain decoding of ``request`` (a speculative answer's fallback, its tokens so
        far in the prompt): the scheduler samples the sequence from here on."""
        return self._scheduler.decode_plainly(self._job, request, self.llama.n_tokens)


class BatchedEngine(ModelFacts):
    """Serves generations by continuous batching in one llama.cpp context; see the
    module docstring. The same interface as ``LlamaEngine``."""

    simulated = False

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._llama = self._load(config)
        self._batcher = BatchScheduler(self._llama, config)

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

    def perf_counters(self) -> dict[str, int]:
        """llama.cpp's own prompt/generation eval counters (a batched step of several
        sequences counts as prompt evaluation)."""
        import llama_cpp

        data = llama_cpp.llama_perf_context(self._batcher.ctx.ctx)
        return {"n_p_eval": int(data.n_p_eval), "n_eval": int(data.n_eval)}

    # -- load ----------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests generating now."""
        return len(self._batcher.running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a sequence."""
        return len(self._batcher.inbox)

    @property
    def session_cache_bytes(self) -> int:
        """Bytes of saved session states: none (idle sequences keep their KV in the cache)."""
        return 0

    @property
    def generated_tokens(self) -> int:
        """Tokens emitted by all requests."""
        return self._batcher.generated_tokens

    @property
    def cancelled_generations(self) -> int:
        """Requests that ended because their client went away."""
        return self._batcher.cancelled_generations

    @property
    def busy_seconds(self) -> float:
        """Seconds the context spent on decode steps (one core's engine-seconds)."""
        return self._batcher.busy_seconds

    @property
    def decode_steps(self) -> int:
        """``llama_decode`` calls the scheduler made."""
        return self._batcher.steps

    @property
    def stepped_sequences(self) -> int:
        """Sequences evaluated, summed over decode steps (over ``decode_steps``: the mean
        batch)."""
        return self._batcher.stepped_sequences

    # -- generation ----------------------------------------------------------

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Run one request; yields token events then one finish event.

        Closing the iterator early (a client disconnect) cancels the request before
        the next decode step and frees its sequence.
        """
        prompt = request.prompt_tokens
        if not prompt or len(prompt) >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this edge's window is {self.n_ctx}"
            )
        if request.sampling.constraint is not None:
            llama_grammar(request.sampling.constraint)  # a bad schema fails here, as a 400
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | FinishEvent | ErrorEvent] = asyncio.Queue()
        released: asyncio.Future[None] = loop.create_future()

        def emit(event: TokenEvent | FinishEvent | ErrorEvent) -> None:
            _call_soon(loop, events.put_nowait, event)

        def release() -> None:
            _call_soon(loop, _resolve, released)

        budget = min(request.sampling.max_tokens, self.n_ctx - len(prompt))
        stats = GenerationStats(prompt_tokens=len(prompt))
        driven = request.decoder is not None
        job = Job(request, stats, emit, release, budget, driven=driven)
        self._batcher.submit(job)
        if driven:
            threading.Thread(
                target=self._drive, args=(job,), name="batched-decoder", daemon=True
            ).start()
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
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

    def _drive(self, job: Job) -> None:
        """A speculative request's own thread: its decode loop on a batched sequence."""
        job.admitted.wait()
        if job.seq is None:  # cancelled or refused before it got a sequence
            return
        decoder = job.request.decoder
        assert decoder is not None
        event: FinishEvent | ErrorEvent
        try:
            text = decoder.run(SequenceRun(self._batcher, job, self.n_ctx))
            if job.stats.finish_reason == "cancelled" and not job.cancel_seen:
                self._batcher.cancelled_generations += 1  # it noticed before the scheduler
            event = FinishEvent(text=text, stats=job.stats)
        except CancelledJob:
            job.stats.finish_reason = "cancelled"
            event = FinishEvent(text="", stats=job.stats)
        except BaseException as exc:  # surfaced on the event loop, never lost
            logger.exception("speculative generation failed on a batched sequence")
            event = ErrorEvent(exc)
        # Let go first: a client that leaves on the last event must not read as a cancel.
        self._batcher.finished_driving(job)
        job.emit(event)

    async def close(self) -> None:
        """Stop taking work, let running generations finish, free llama.cpp."""
        await asyncio.to_thread(self._batcher.close)
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
