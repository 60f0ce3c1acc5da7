"""The edge's simulated engine: llama.cpp's queue and prefix reuse on modelled time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future

import pytest

from edge.drafter import SpeculativeDecoder
from edge.errors import InvalidRequestError, QueueFullError
from edge.generation import EngineConfig, FinishEvent, GenerationRequest, GenerationStats
from edge.sampling import SamplingParams
from edge.sim_engine import SimEngine
from models.catalog import Catalog
from models.convert import edge_gguf_path
from models.latency import EngineProfile, LinearFit

pytestmark = pytest.mark.timeout(60)

# ttft = 20 ms + 0.1 ms/token; tpot = 5 ms (one sequence per slot).
PROFILE = EngineProfile(
    engine="test line",
    ttft=LinearFit(intercept=0.020, slope=0.0001, r2=1.0, n=2),
    tpot=LinearFit(intercept=0.004, slope=0.001, r2=1.0, n=2),
    max_batch=1,
    max_step_tokens=512,
    kv_bytes_per_token=1000,
)


@pytest.fixture
async def engine() -> AsyncIterator[SimEngine]:
    config = EngineConfig(
        model_path=edge_gguf_path(Catalog.load().get("smollm2-135m")),
        slots=1,
        max_queue=1,
        session_cache_bytes=10_000_000,
    )
    sim = SimEngine(config, PROFILE)
    yield sim
    await sim.close()


async def _generate(engine: SimEngine, request: GenerationRequest) -> GenerationStats:
    async for event in engine.generate(request):
        if isinstance(event, FinishEvent):
            return event.stats
    raise AssertionError("no finish event")


def _request(prompt: list[int], session: str | None, max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=prompt, sampling=SamplingParams(max_tokens=max_tokens), session_id=session
    )


async def test_a_second_turn_reuses_the_first_turns_prefix(engine: SimEngine) -> None:
    first = engine.tokenize("User: plan the refactoring of the router module, step by step.")
    stats = await _generate(engine, _request(first, "s1"))
    assert stats.simulated and stats.cached_tokens == 0 and stats.completion_tokens == 10
    # engine_s = the slot wait (wall time: a free slot still costs a loop iteration, which
    # a busy machine can stretch to milliseconds) + the modelled steps (exact).
    assert 0 <= stats.queue_s < 0.5
    assert stats.engine_s - stats.queue_s == pytest.approx(
        PROFILE.ttft_s(len(first)) + 9 * PROFILE.tpot_s(1), abs=1e-6
    )
    second = [*first, *engine.tokenize(" Assistant: done. User: now test it.")]
    again = await _generate(engine, _request(second, "s1"))
    assert again.cached_tokens == len(first)
    other = await _generate(engine, _request(second, "s2"))
    assert other.cached_tokens == 0  # another session's KV is not this one's
    assert engine.perf_counters()["n_p_eval"] == len(first) + (len(second) - len(first)) + len(
        second
    )


async def test_the_slot_queue_is_fifo_bounded_and_counted_in_engine_time(
    engine: SimEngine,
) -> None:
    prompt = engine.tokenize("Hello")
    running = asyncio.ensure_future(_generate(engine, _request(prompt, "a", max_tokens=20)))
    await asyncio.sleep(0.005)
    queued = asyncio.ensure_future(_generate(engine, _request(prompt, "b", max_tokens=2)))
    await asyncio.sleep(0.005)
    assert (engine.running, engine.waiting) == (1, 1)
    with pytest.raises(QueueFullError):
        await _generate(engine, _request(prompt, "c"))
    first, second = await asyncio.gather(running, queued)
    assert first.queue_s < 0.01  # a free slot: no wait
    assert second.queue_s > 0.05  # it waited for the whole first answer
    assert second.engine_s == pytest.approx(
        second.queue_s + PROFILE.ttft_s(len(prompt)) + PROFILE.tpot_s(1), abs=1e-3
    )


async def test_the_speculative_route_is_refused(engine: SimEngine) -> None:
    request = _request(engine.tokenize("Hi"), None)
    request.decoder = SpeculativeDecoder(lambda context, draft: Future())  # refused up front
    with pytest.raises(InvalidRequestError):
        await _generate(engine, request)
