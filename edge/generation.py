"""What an edge engine takes and yields, shared by both engines and the code around them.

A ``GenerationRequest`` goes in; ``TokenEvent``s and one ``FinishEvent`` (with
its ``GenerationStats``) come out. The llama.cpp engine (``edge.engine``), the
simulated engine (``edge.sim_engine``) and the cloud route (``edge.cloud_route``)
all speak these types, so the answer builders, the router's observations and the
serving layer never import an engine.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge.escalation import ConfidenceWatch
from edge.sampling import SamplingParams
from mesh.protocol import TokenLogprob
from models.catalog import DEFAULT_N_CTX
from models.token_cache import CachedTokenizer

if TYPE_CHECKING:
    from edge.batched_engine import SequenceRun
    from edge.engine import SlotRun


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to load a model; built from the edge settings."""

    model_path: Path
    n_ctx: int = DEFAULT_N_CTX
    n_threads: int = 1
    n_threads_batch: int = 1
    n_batch: int = 512
    slots: int = 1
    max_queue: int = 64
    session_cache_bytes: int = 512 * 1024 * 1024
    # The batched engine (``edge.batched_engine``): one context decoding ``sequences``
    # requests together, a KV cache of ``kv_tokens`` (unset: 8 windows), prompts
    # evaluated ``prefill_chunk`` tokens per step. ``slots`` then sizes the slot path
    # the speculative route still takes.
    batched: bool = False
    sequences: int = 32
    kv_tokens: int | None = None
    prefill_chunk: int = 128

    @property
    def concurrency(self) -> int:
        """Requests the engine generates for at once."""
        return self.sequences if self.batched else self.slots


class Decoder(Protocol):
    """A decode loop other than plain sampling on the edge model: the speculative one
    (``edge.drafter.SpeculativeDecoder``). It runs in the slot's thread, or on a batched
    engine in a thread of its own."""

    def run(self, run: SlotRun | SequenceRun) -> str:
        """Generate on the slot; return the text not yet emitted."""
        ...


@dataclass
class GenerationRequest:
    """One prompt to complete on the engine, and how to decode it."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    session_id: str | None = None
    # The digest of the rendered chat ``prompt_tokens`` were tokenized from
    # (``RenderedPrompt.digest``), so a cloud worker can reuse them; None otherwise.
    prompt_sha256: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    decoder: Decoder | None = None  # None: plain decoding on the edge model
    # Plain decoding only: stop (finish_reason "escalate") when the model grows unsure.
    confidence: ConfidenceWatch | None = None


@dataclass(frozen=True)
class Handover:
    """An edge answer that stopped unsure and continued on a stronger route."""

    at_token: int  # completion tokens the edge had produced
    mean_logprob: float  # over the window that triggered it
    to: str  # the route that finished the answer


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
    handover: Handover | None = None  # set when the answer changed route midway
    cloud_lost: CloudLost | None = None  # a cloud answer the edge finished itself


@dataclass(frozen=True)
class CloudLost:
    """A cloud answer whose workers all went away mid-answer; the edge finished it."""

    at_token: int  # completion tokens the cloud had produced
    error: str  # why the cloud route gave up


@dataclass(frozen=True)
class TokenEvent:
    """Newly generated tokens and the text they made final (may be empty); with their
    log-probabilities (one per token) when the request asked for them."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """End of generation: the last text, why it stopped, and parsed tool calls if the
    generator parsed them itself (the cloud route does, with vLLM's parser)."""

    text: str
    stats: GenerationStats
    tool_calls: list[dict[str, Any]] | None = None


Event = TokenEvent | FinishEvent
Events = AsyncIterator[Event]


class EdgeEngine(Protocol):
    """What the daemon needs of an engine: ``LlamaEngine``, or ``SimEngine`` for scale runs."""

    config: EngineConfig
    simulated: bool

    @property
    def generated_tokens(self) -> int: ...
    @property
    def cancelled_generations(self) -> int: ...
    @property
    def busy_seconds(self) -> float: ...
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
    def token_bytes(self, token: int) -> bytes: ...
    def perf_counters(self) -> dict[str, int]: ...
    def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]: ...
    async def close(self) -> None: ...
