"""The cloud worker's simulated engine: vLLM's interface and continuous batching, no model.

For scale runs only (``tandem cloud serve --engine sim``): the worker, its NATS
service, streaming, cancellation and draining run unchanged; this class stands
in for ``VllmEngine``. It imports no vLLM and no torch.

The scheduler is vLLM's continuous batching with chunked prefill, reduced to its
timing: a loop of steps; each step admits waiting requests while the batch has
room (``max_batch``), gives every decoding sequence one token, and spends the rest
of the step's token budget (``max_step_tokens``) on the prompts still being
prefilled, oldest first. A step lasts ``tpot_s(sequences emitting a token)``
from the calibrated profile plus ``prefill_s_per_token`` for each prompt token it
evaluates (and ``prefill_fixed_s`` for each prompt it starts), so time per token
grows with the running batch exactly as measured on the real engine, and long
prompts slow everyone's step as they do in vLLM. A sequence emits its first token
at the end of the step that finishes its prefill. Prefix caching is modelled on
whole blocks of ``BLOCK_TOKENS`` (vLLM-CPU's granularity) in an LRU bounded by
the KV cache size.

Answers are the filler text of ``models.sim_vocab`` in real token ids; the final
delta carries the request's modelled engine time (queueing + its steps), which
the worker reports as ``simulated`` in the stream's usage.

Disaggregation (``--role prefill|decode``) runs on the same scheduler: each role's
steps follow its own engine profile (``LatencyProfile.cloud_for``); a prefill is a
request with one output token whose reply hands over ``simulated_kv_tokens`` (whole
blocks, as vLLM's connectors move them); a decode request carrying them waits the
modelled KV transfer (``DisaggregationProfile.transfer_s``) before it is scheduled,
then finds those tokens cached.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cloud.engine import BusyClock, Delta, EngineLoad, PrefillResult, check_messages
from cloud.errors import BadGenerateRequestError
from cloud.settings import CloudSettings
from cloud.speculative import Verdict
from mesh.protocol import SamplingParams as WireSampling
from models.catalog import Catalog, ModelPair
from models.chat_template import load_template, render_chat
from models.convert import edge_gguf_path
from models.errors import ModelError
from models.latency import DisaggregationProfile, EngineProfile, LatencyProfile
from models.sim_vocab import SimVocab

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 128
# The hand-over a simulated prefill worker replies with: how many prompt tokens' KV the
# decode worker receives (kv_transfer_params carry it from one engine to the other).
SIM_KV_TOKENS = "simulated_kv_tokens"


@dataclass
class _Sequence:
    """One request inside the simulated scheduler."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    stop: list[str]
    enqueued_at: float
    out: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    cached: int = 0
    to_prefill: int = 0  # prompt tokens not yet evaluated (after the prefix cache)
    started_prefill: bool = False
    emitted: int = 0
    text: str = ""
    transferred: int = 0  # prompt tokens whose KV came from a (simulated) prefill worker
    ready_at: float = 0.0  # when it may be scheduled: after its KV transfer, if any


@dataclass(frozen=True)
class SimChatRequest:
    """What ``validate`` returns, as vLLM's request model does: the chat's tools."""

    tools: list[dict[str, Any]] | None


class PrefixCache:
    """Which whole prompt blocks vLLM would have in its prefix cache (LRU by block)."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    @property
    def capacity(self) -> int:
        """Blocks the cache holds at most."""
        return self._capacity

    def hit_tokens(self, prompt: list[int]) -> int:
        """Cached tokens of ``prompt`` (its leading cached blocks); caches all its blocks."""
        cached, hits_so_far = 0, True
        for key in _block_keys(prompt):
            if hits_so_far and key in self._blocks:
                cached += BLOCK_TOKENS
                self._blocks.move_to_end(key)
                continue
            hits_so_far = False
            self._blocks[key] = None
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)
        return cached


def _block_keys(tokens: list[int]) -> list[int]:
    """Chained hashes of each whole block: a block's key depends on everything before it."""
    keys, previous = [], 0
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hash((previous, *tokens[start : start + BLOCK_TOKENS]))
        keys.append(previous)
    return keys


class SimVllmEngine:
    """Stands in for ``VllmEngine`` with modelled time; see the module docstring."""

    simulated = True

    def __init__(
        self,
        settings: CloudSettings,
        profile: EngineProfile | None = None,
        vocab: SimVocab | None = None,
        split: DisaggregationProfile | None = None,
    ) -> None:
        """``vocab`` lets several simulated workers in one process share one vocabulary."""
        self.settings = settings
        self.pair: ModelPair = Catalog.load().get(settings.model)
        self.template = load_template(self.pair.chat_template)
        if profile is None or split is None:
            latency = LatencyProfile.load(settings.sim_profile)
            profile = profile or latency.cloud_for(settings.role)
            split = split or latency.disaggregation
        self.profile = profile
        self.split = split
        self.load = EngineLoad()
        self.busy = BusyClock()
        kv_tokens = int(settings.kv_cache_gb * 2**30) // self.profile.kv_bytes_per_token
        self.prefix_cache = PrefixCache(kv_tokens // BLOCK_TOKENS)
        self._vocab = vocab
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the vocabulary and start the scheduler loop."""
        if self._vocab is None:
            self._vocab = await asyncio.to_thread(SimVocab, edge_gguf_path(self.pair))
        self._scheduler = asyncio.create_task(self._schedule(), name="sim-scheduler")
        logger.info(
            "SIMULATED engine for %s (profile of %s, max batch %d)",
            self.pair.name,
            self.profile.engine,
            self.profile.max_batch,
        )

    @property
    def loaded(self) -> bool:
        """Whether ``start`` has finished (vocabulary loaded, scheduler running)."""
        return self._scheduler is not None

    @property
    def vocab(self) -> SimVocab:
        """The vocabulary (after ``start``)."""
        if self._vocab is None:
            raise RuntimeError("the simulated engine is not started")
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of token ids the target accepts."""
        return self.vocab.n_vocab

    @property
    def block_size(self) -> int:
        """The modelled prefix cache's block (vLLM-CPU's)."""
        return BLOCK_TOKENS

    @property
    def cache_blocks(self) -> int:
        """Blocks the modelled KV cache holds."""
        return self.prefix_cache.capacity

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """Prompt token ids of a chat: the catalog template, the real vocabulary."""
        return self.tokenize(self.render_text(messages, tools))

    def render_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str:
        """A chat's prompt text: the catalog template, ending with the assistant header."""
        try:
            return render_chat(self.template, messages, tools=tools)
        except ModelError as exc:
            raise BadGenerateRequestError(f"cannot render the conversation: {exc}") from exc

    def tokenize(self, text: str) -> list[int]:
        """A rendered prompt's token ids (the real vocabulary)."""
        return self.vocab.tokenize(text)

    def validate(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any
    ) -> SimChatRequest:
        """The checks ``VllmEngine.validate`` makes that matter without vLLM's request model."""
        check_messages(messages)
        return SimChatRequest(tools=tools)

    def parse_tool_calls(
        self, text: str, request: Any
    ) -> tuple[str | None, list[dict[str, Any]] | None]:
        """The filler never calls a tool."""
        return text, None

    async def verify(
        self,
        request_id: str,
        context: list[int],
        draft: list[int],
        sampling: WireSampling | None = None,
        draft_distributions: list[Any] | None = None,
    ) -> tuple[Verdict, int]:
        """Not simulated: draft verification needs the real target's logits."""
        raise BadGenerateRequestError(
            "the simulated engine does not verify drafts; run the worker with --engine real"
        )

    # -- generation ---------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: WireSampling,
        resume_ids: list[int],
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        """Queue the request in the simulated scheduler and relay its deltas (after the
        modelled KV transfer, when a prefill worker handed some over)."""
        full_prompt = prompt_ids + resume_ids
        room = self.settings.max_model_len - len(full_prompt)
        if room <= 0:
            raise BadGenerateRequestError(
                f"This model's maximum context length is {self.settings.max_model_len} tokens, "
                f"but the prompt takes {len(full_prompt)} tokens."
            )
        wanted = room if sampling.max_tokens is None else sampling.max_tokens - len(resume_ids)
        if wanted > room:
            raise BadGenerateRequestError(
                f"This model's maximum context length is {self.settings.max_model_len} tokens; "
                f"{len(full_prompt)} prompt tokens leave room for {room}, not {wanted}."
            )
        seq = _Sequence(
            request_id,
            full_prompt,
            max(1, wanted),
            sampling.stop or [],
            enqueued_at=asyncio.get_running_loop().time(),
        )
        handed = int((kv_transfer_params or {}).get(SIM_KV_TOKENS, 0))
        seq.transferred = max(0, min(handed, len(full_prompt) - 1))
        # The pull happens before vLLM schedules the request, and counts in its time.
        seq.ready_at = seq.enqueued_at + self.split.transfer_s(seq.transferred)
        if seq.transferred:
            await asyncio.sleep(max(0.0, seq.ready_at - asyncio.get_running_loop().time()))
        self._waiting.append(seq)
        self.load.waiting = len(self._waiting)
        self._wake.set()
        try:
            with self.busy.occupied():
                while True:
                    delta = await seq.out.get()
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            self._remove(request_id)

    async def prefill(
        self, request_id: str, prompt_ids: list[int], kv_transfer_params: dict[str, Any] | None
    ) -> PrefillResult:
        """A prefill worker's request: the prompt and one token through the scheduler; the
        reply hands the prompt's whole blocks over to the decode worker."""
        first, cached, engine_s = None, 0, None
        greedy_one = WireSampling(max_tokens=1, temperature=0.0)
        async for delta in self.generate(request_id, prompt_ids, greedy_one, []):
            first = delta.token_ids[0] if delta.token_ids else first
            cached, engine_s = delta.cached_tokens, delta.engine_s
        whole_blocks = (len(prompt_ids) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        return PrefillResult(
            first_token=first,
            cached_tokens=cached,
            kv_transfer_params={SIM_KV_TOKENS: whole_blocks},
            engine_s=engine_s,
        )

    async def abort(self, request_id: str) -> None:
        """Drop a request from the scheduler."""
        self._remove(request_id)

    def _remove(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                break
        self.load.waiting = len(self._waiting)

    async def _schedule(self) -> None:
        """The step loop: admit, advance the modelled clock by the step, emit one token each."""
        loop = asyncio.get_running_loop()
        clock = 0.0  # the modelled time; set by the first request's arrival
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                if not self._waiting:
                    continue  # aborted before the scheduler woke
            if not self._running:
                # An idle engine starts stepping when the request arrived, not when this
                # loop got round to it: the wake-up lag is the event loop's, not the model's.
                # (That includes a first request queued before this task first ran: CI saw
                # 1.5 ms of start-up lag counted as model time.)
                clock = max(clock, self._waiting[0].ready_at)
            self._admit()
            emitting, step = self._plan_step()
            # Absolute step ends: event-loop lag does not pile up into modelled time.
            clock += step
            await asyncio.sleep(max(0.0, clock - loop.time()))
            for seq in emitting:
                if seq.request_id in self._running:  # not aborted meanwhile
                    self._emit(seq, clock)

    def _plan_step(self) -> tuple[list[_Sequence], float]:
        """Which sequences emit a token at the end of this step, and how long it lasts."""
        p = self.profile
        emitting = [s for s in self._running.values() if s.to_prefill == 0]
        budget = p.max_step_tokens - len(emitting)
        prefill_s = 0.0
        for seq in self._running.values():  # admission order: oldest prompt first
            if budget <= 0:
                break
            if seq.to_prefill == 0:
                continue
            chunk = min(budget, seq.to_prefill)
            prefill_s += chunk * p.prefill_s_per_token
            if not seq.started_prefill:
                prefill_s += p.prefill_fixed_s
                seq.started_prefill = True
            seq.to_prefill -= chunk
            budget -= chunk
            if seq.to_prefill == 0:
                emitting.append(seq)  # its first token comes out of this step
        return emitting, p.tpot_s(len(emitting)) + prefill_s

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.profile.max_batch:
            seq = self._waiting.popleft()
            hit = max(self.prefix_cache.hit_tokens(seq.prompt), seq.transferred)
            seq.cached = min(hit, len(seq.prompt) - 1)
            seq.to_prefill = len(seq.prompt) - seq.cached
            self.load.prefix_queries += len(seq.prompt)
            self.load.prefix_hits += seq.cached
            self.load.computed_tokens += seq.to_prefill
            self._running[seq.request_id] = seq
        self.load.waiting = len(self._waiting)
        self.load.kv_cache_usage = len(self._running) / self.profile.max_batch

    def _emit(self, seq: _Sequence, clock: float) -> None:
        token = self.vocab.filler_token(seq.emitted)
        seq.emitted += 1
        self.load.generated_tokens += 1
        self.load.computed_tokens += 1
        piece = self.vocab.token_bytes(token).decode("utf-8", errors="replace")
        text, finish = seq.text + piece, None
        cut = min((i for s in seq.stop if (i := text.find(s)) >= 0), default=None)
        if cut is not None:
            piece, finish = piece[: max(0, cut - len(seq.text))], "stop"
        elif seq.emitted >= seq.max_tokens:
            finish = "length"
        seq.text = text
        seq.out.put_nowait(
            Delta(
                token_ids=[token],
                text=piece,
                finish_reason=finish,
                cached_tokens=seq.cached,
                engine_s=clock - seq.enqueued_at if finish else None,
            )
        )
        if finish is not None:
            self._running.pop(seq.request_id, None)

    def shutdown(self) -> None:
        """Stop the scheduler loop."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            self._scheduler = None
