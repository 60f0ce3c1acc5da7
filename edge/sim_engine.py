"""The edge's simulated engine: llama.cpp's interface and timing, no forward pass.

For scale runs only (``tandem edge serve --engine sim``). Everything else in the
daemon (HTTP, router, cloud route, NATS) runs unchanged. The engine keeps the
real engine's queueing (``slots`` concurrent generations, FIFO, 429 past
``max_queue``) and per-session prefix reuse, and replaces each generation with
sleeps from the latency profile: ``ttft_s`` of the uncached prompt, then
``tpot_s(1)`` per token (a llama.cpp slot decodes one sequence). Tokens are the
real vocabulary's, the text a filler that says it is simulated, and every
answer is marked: ``stats.simulated`` (``usage.tandem.simulated``) and the
modelled engine time (``stats.engine_s``) that benchmarks subtract to get the
mesh's own latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.errors import InvalidRequestError
from edge.generation import (
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
)
from edge.sessions import common_prefix_len
from edge.slot_queue import SlotQueue
from edge.text import TextAssembler
from models.latency import EngineProfile
from models.sim_vocab import SimVocab
from models.token_cache import CachedTokenizer


class SimEngine:
    """Serves generations on modelled time; the same interface as ``LlamaEngine``."""

    simulated = True

    def __init__(self, config: EngineConfig, profile: EngineProfile) -> None:
        self.config = config
        self.profile = profile
        self._vocab = SimVocab(config.model_path)
        self._queue = SlotQueue(list(range(config.slots)), config.max_queue)
        # Each conversation's tokens, as if its KV were kept: bounded by the KV bytes the
        # real engine's session cache would hold (``session_cache_bytes``).
        self._sessions: OrderedDict[str, np.ndarray] = OrderedDict()
        self._session_tokens = 0
        self._session_token_budget = config.session_cache_bytes // profile.kv_bytes_per_token
        self.generated_tokens = 0
        self.cancelled_generations = 0
        self._prompt_tokens_evaluated = 0
        self.busy_seconds = 0.0  # slot-seconds spent serving, as LlamaEngine counts them

    # -- facts about the model ------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Context window in tokens."""
        return self.config.n_ctx

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self._vocab.n_vocab

    @property
    def token_cache(self) -> CachedTokenizer:
        """The prompt-piece cache ``tokenize`` goes through."""
        return self._vocab.token_cache

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the real vocabulary (blocking: call from a thread)."""
        return self._vocab.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token id of the simulated vocabulary."""
        return self._vocab.token_bytes(token)

    def perf_counters(self) -> dict[str, int]:
        """The modelled counterparts of llama.cpp's prompt/generation eval counters."""
        return {"n_p_eval": self._prompt_tokens_evaluated, "n_eval": self.generated_tokens}

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
        """Modelled KV bytes of the remembered conversations."""
        return self._session_tokens * self.profile.kv_bytes_per_token

    # -- generation ----------------------------------------------------------

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Run one request on modelled time; yields token events then one finish event."""
        if request.decoder is not None:
            raise InvalidRequestError(
                "the simulated engine serves the edge and cloud routes only; the speculative "
                "route needs llama.cpp (tandem edge serve --engine real)",
                param="model",
            )
        stats = GenerationStats(prompt_tokens=len(request.prompt_tokens), simulated=True)
        queued_at = time.perf_counter()
        slot = await self._queue.acquire()
        stats.queue_s = time.perf_counter() - queued_at
        started = time.perf_counter()
        try:
            async for event in self._decode(request, stats):
                yield event
        finally:
            self.busy_seconds += time.perf_counter() - started
            self._queue.release(slot)

    async def _decode(
        self, request: GenerationRequest, stats: GenerationStats
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        prompt = request.prompt_tokens
        stats.cached_tokens = self._reuse_prefix(request)
        uncached = len(prompt) - stats.cached_tokens
        self._prompt_tokens_evaluated += uncached
        budget = min(request.sampling.max_tokens, self.n_ctx - len(prompt))
        ttft, tpot = self.profile.ttft_s(uncached), self.profile.tpot_s(1)
        assembler = TextAssembler(request.sampling.stop)
        loop = asyncio.get_running_loop()
        # Token i is due at start + ttft + i·tpot: sleeping to absolute times keeps
        # event-loop lag from accumulating into the modelled time.
        start = loop.time()
        stats.finish_reason = "length"
        for i in range(budget):
            await asyncio.sleep(max(0.0, start + ttft + i * tpot - loop.time()))
            if request.cancel.is_set():
                stats.finish_reason = "cancelled"
                self.cancelled_generations += 1
                break
            token = self._vocab.filler_token(i)
            stats.completion_tokens += 1
            self.generated_tokens += 1
            yield TokenEvent([token], assembler.push(self._vocab.token_bytes(token)))
            if assembler.stopped:
                stats.finish_reason = "stop"
                break
        modelled = ttft + max(0, stats.completion_tokens - 1) * tpot
        stats.engine_s = stats.queue_s + modelled
        yield FinishEvent(text=assembler.finish(), stats=stats)

    def _reuse_prefix(self, request: GenerationRequest) -> int:
        """Cached prompt tokens: the longest prefix shared with a remembered conversation."""
        prompt = request.prompt_tokens
        key = request.session_id or f"anon-{id(request)}"
        old = self._sessions.pop(key, None)
        best = 0 if old is None else common_prefix_len(old, prompt)
        self._session_tokens -= 0 if old is None else len(old)
        self._sessions[key] = np.asarray(prompt, dtype=np.int32)
        self._session_tokens += len(prompt)
        while self._session_tokens > self._session_token_budget and self._sessions:
            _, evicted = self._sessions.popitem(last=False)
            self._session_tokens -= len(evicted)
        # At least one prompt token is always evaluated, as in llama.cpp.
        return min(best, len(prompt) - 1)

    # -- slot queue ----------------------------------------------------------

    async def close(self) -> None:
        """Stop taking work and free the vocabulary."""
        self._queue.close()
        self._vocab.close()


ENGINE_HEADER = b"x-tandem-engine"


class SimulatedEngineHeader:
    """ASGI middleware: every response of a simulated edge says so (``x-tandem-engine: sim``).

    Pure ASGI rather than a Starlette ``BaseHTTPMiddleware``: it only touches the
    response start message, so streams pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (ENGINE_HEADER, b"sim")]
            await send(message)

        await self.app(scope, receive, labelled)
