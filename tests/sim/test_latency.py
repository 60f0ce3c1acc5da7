"""The latency model: least-squares fits, the shipped profile, and the simulated scheduler's
modelled time (read from its model clock, so these tests time nothing on the wall)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from cloud.settings import CloudSettings
from cloud.sim_engine import BLOCK_TOKENS, PrefixCache, SimVllmEngine
from mesh.protocol import SamplingParams
from models.latency import EngineProfile, LatencyProfile, LatencyProfileError, LinearFit, fit_line
from models.sim_vocab import FILLER_TEXT

pytestmark = pytest.mark.timeout(60)


def test_fit_recovers_a_known_line_from_noisy_samples() -> None:
    rng = random.Random(7)
    xs = [rng.randint(1, 2000) for _ in range(200)]
    ys = [0.040 + 0.0015 * x + rng.gauss(0, 0.01) for x in xs]
    fit = fit_line(xs, ys)
    assert fit.intercept == pytest.approx(0.040, abs=0.004)
    assert fit.slope == pytest.approx(0.0015, rel=0.01)
    assert fit.r2 > 0.99
    assert fit.n == 200


def test_fit_is_exact_on_a_perfect_line_and_reports_poor_fits() -> None:
    exact = fit_line([1, 2, 4, 8], [3.0, 5.0, 9.0, 17.0])  # y = 1 + 2x
    assert (exact.intercept, exact.slope, exact.r2) == pytest.approx((1.0, 2.0, 1.0))
    rng = random.Random(3)
    noise = fit_line(list(range(50)), [rng.random() for _ in range(50)])
    assert noise.r2 < 0.2


def test_a_negative_intercept_is_refitted_through_the_origin() -> None:
    # Upward-curving timings: OLS would say a 0-token prompt takes negative time.
    xs, ys = [10, 100, 500, 1000], [0.05, 0.6, 4.0, 10.0]
    fit = fit_line(xs, ys)
    assert fit.intercept == 0.0
    through_origin = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    assert fit.slope == pytest.approx(through_origin)
    assert fit.r2 > 0.9


def test_fit_needs_two_distinct_x_values() -> None:
    with pytest.raises(LatencyProfileError):
        fit_line([4, 4, 4], [1.0, 2.0, 3.0])
    with pytest.raises(LatencyProfileError):
        fit_line([1, 2], [1.0])


def test_shipped_profile_is_labelled_and_its_fits_come_from_its_samples() -> None:
    profile = LatencyProfile.default()
    assert "SIMULATED" in profile.label
    assert profile.machine and profile.measured_at and profile.command.startswith("python bench/")
    for engine in (profile.edge, profile.cloud):
        # Nobody edited the coefficients by hand: refitting the samples gives them back.
        ttft = fit_line([x for x, _ in engine.ttft_samples], [y for _, y in engine.ttft_samples])
        tpot = fit_line([x for x, _ in engine.tpot_samples], [y for _, y in engine.tpot_samples])
        assert ttft.model_dump() == pytest.approx(engine.ttft.model_dump())
        assert tpot.model_dump() == pytest.approx(engine.tpot.model_dump())
        assert engine.ttft.slope > 0  # a longer prompt takes longer to prefill
    cloud = profile.cloud
    assert cloud.tpot_s(32) > cloud.tpot_s(1)  # vLLM's decode step grows with the batch
    assert cloud.max_batch >= 32


def _profile(max_batch: int = 64, max_step_tokens: int = 2048) -> EngineProfile:
    # ttft = 50 ms + 1 ms/token; tpot = 10 ms + 2 ms x batch.
    return EngineProfile(
        engine="test line",
        ttft=LinearFit(intercept=0.050, slope=0.001, r2=1.0, n=2),
        tpot=LinearFit(intercept=0.010, slope=0.002, r2=1.0, n=2),
        max_batch=max_batch,
        max_step_tokens=max_step_tokens,
        kv_bytes_per_token=1024,
    )


def test_prefill_adds_to_a_step_so_a_lone_prompt_takes_its_ttft() -> None:
    p = _profile()
    one_step = p.tpot_s(1) + p.prefill_fixed_s + 200 * p.prefill_s_per_token
    assert one_step == pytest.approx(p.ttft_s(200))
    assert p.prefill_fixed_s == pytest.approx(0.050 - 0.012)


def test_prefix_cache_counts_whole_leading_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100)
    first = list(range(3 * BLOCK_TOKENS + 5))
    assert cache.hit_tokens(first) == 0
    shared_two_blocks = first[: 2 * BLOCK_TOKENS] + [99_999] * BLOCK_TOKENS
    assert cache.hit_tokens(shared_two_blocks) == 2 * BLOCK_TOKENS
    assert cache.hit_tokens([7, *first]) == 0  # same tokens, shifted: nothing matches
    tiny = PrefixCache(capacity_blocks=1)
    tiny.hit_tokens(first)
    assert tiny.hit_tokens(first) == 0  # the first block was evicted by the later ones


@pytest.fixture
async def sim_engine() -> AsyncIterator[SimVllmEngine]:
    engine = SimVllmEngine(
        CloudSettings.model_validate({"engine": "sim", "kv_cache_gb": 1}), _profile()
    )
    await engine.start()
    yield engine
    engine.shutdown()


async def _run(engine: SimVllmEngine, prompt: list[int], max_tokens: int) -> tuple[str, float]:
    text, engine_s = "", None
    async for delta in engine.generate(
        f"r{random.random()}", prompt, SamplingParams(max_tokens=max_tokens), []
    ):
        text += delta.text
        engine_s = delta.engine_s
    assert engine_s is not None
    return text, engine_s


async def test_a_lone_request_takes_ttft_then_one_step_per_token(sim_engine: SimVllmEngine) -> None:
    prompt = sim_engine.vocab.tokenize("Hello there, how are you today?")
    text, engine_s = await _run(sim_engine, prompt, max_tokens=20)
    p = sim_engine.profile
    assert engine_s == pytest.approx(p.ttft_s(len(prompt)) + 19 * p.tpot_s(1), abs=1e-3)
    assert text == "".join(
        sim_engine.vocab.token_bytes(sim_engine.vocab.filler_token(i)).decode() for i in range(20)
    )
    assert text.startswith(FILLER_TEXT[: len(text)])


async def test_concurrent_requests_batch_and_each_step_grows_with_the_batch(
    sim_engine: SimVllmEngine,
) -> None:
    prompts = [sim_engine.vocab.tokenize(f"{i} question about batching") for i in range(8)]
    results = await asyncio.gather(*(_run(sim_engine, p, max_tokens=10) for p in prompts))
    p = sim_engine.profile
    first_step = p.tpot_s(8) + sum(
        p.prefill_fixed_s + p.prefill_s_per_token * len(t) for t in prompts
    )
    # All 8 were admitted in one step; then 9 decode steps at batch 8. The step starts
    # when the first of them arrived, so that one's engine time is exactly the model's;
    # the event loop enqueued the others one after another, up to a few ms later on a
    # busy machine (CI once saw 2.4 ms), and each counts from its own arrival.
    expected = first_step + 9 * p.tpot_s(8)
    engine_times = [engine_s for _, engine_s in results]
    assert max(engine_times) == pytest.approx(expected, abs=1e-3)
    assert all(expected - 0.05 < t <= expected + 1e-3 for t in engine_times), engine_times
    assert sim_engine.load.generated_tokens == 80
    # No prompt shares a first token with another: each was computed whole.
    assert sim_engine.load.computed_tokens == sum(len(t) for t in prompts) + 80


async def test_requests_past_the_batch_limit_wait_for_a_free_place() -> None:
    engine = SimVllmEngine(
        CloudSettings.model_validate({"engine": "sim", "kv_cache_gb": 1}), _profile(max_batch=2)
    )
    await engine.start()
    try:
        prompts = [engine.vocab.tokenize(f"{i} waiting") for i in range(3)]
        results = await asyncio.gather(*(_run(engine, p, max_tokens=5) for p in prompts))
    finally:
        engine.shutdown()
    first_two, third = [s for _, s in results[:2]], results[2][1]
    assert first_two[0] == pytest.approx(first_two[1], abs=1e-3)
    assert third > first_two[0]  # it queued until one of the first two finished


async def test_a_long_prompt_is_prefilled_in_chunks_of_the_step_budget() -> None:
    engine = SimVllmEngine(
        CloudSettings.model_validate({"engine": "sim", "kv_cache_gb": 1}),
        _profile(max_step_tokens=100),
    )
    await engine.start()
    try:
        prompt = [engine.vocab.filler_token(i) for i in range(450)]
        _, engine_s = await _run(engine, prompt, max_tokens=1)
    finally:
        engine.shutdown()
    p = engine.profile
    # 5 steps of at most 100 prompt tokens; the fifth emits the only token.
    assert engine_s == pytest.approx(
        5 * p.tpot_s(1) + p.prefill_fixed_s + 450 * p.prefill_s_per_token, abs=1e-3
    )


async def test_stop_sequences_end_a_simulated_answer(sim_engine: SimVllmEngine) -> None:
    prompt = sim_engine.vocab.tokenize("stop early")
    text = ""
    finish = None
    async for delta in sim_engine.generate(
        "stop-test", prompt, SamplingParams(max_tokens=60, stop=["simulated"]), []
    ):
        text += delta.text
        finish = delta.finish_reason
    assert finish == "stop"
    assert text == FILLER_TEXT[: FILLER_TEXT.index("simulated")]
