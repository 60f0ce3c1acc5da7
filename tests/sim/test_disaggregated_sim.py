"""The simulated engine's prefill/decode split (SIMULATED ENGINE): the latency model of the
hand-over, and a simulated prefill/decode pair of real workers on a real nats-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from cloud.settings import CloudSettings
from cloud.sim_engine import BLOCK_TOKENS, SIM_KV_TOKENS, SimVllmEngine
from cloud.worker import CloudWorker
from mesh import subjects
from mesh.connection import connect
from mesh.protocol import GenerateAccepted, GenerateRequest, SamplingParams, TokenChunk
from mesh.server import EmbeddedNats
from models.latency import DisaggregationProfile, LatencyProfile

pytestmark = pytest.mark.timeout(60)


def test_the_shipped_split_is_calibrated_and_its_engines_are_the_cloud_profile() -> None:
    """The KV hand-over line measured by bench/disagg_bench.py on this machine (its
    source names the run and the load); prefill and decode engines stay the cloud's."""
    profile = LatencyProfile.default()
    split = profile.disaggregation
    assert split.calibrated is True and "disagg_bench" in split.source
    assert split.kv_transfer_s_per_token > 0 and split.transfer_samples
    assert profile.cloud_for("prefill") == profile.cloud == profile.cloud_for("decode")
    assert split.transfer_s(0) == 0.0
    assert split.transfer_s(1000) == pytest.approx(
        split.kv_transfer_fixed_s + 1000 * split.kv_transfer_s_per_token
    )


async def test_a_handed_over_prompt_pays_the_transfer_and_prefills_only_the_rest() -> None:
    split = DisaggregationProfile(kv_transfer_s_per_token=1e-4, kv_transfer_fixed_s=0.01)
    settings = CloudSettings.model_validate({"engine": "sim", "role": "prefill"})
    prefill = SimVllmEngine(settings, split=split)
    await prefill.start()
    decode = SimVllmEngine(
        CloudSettings.model_validate({"engine": "sim", "role": "decode"}),
        split=split,
        vocab=prefill.vocab,
    )
    await decode.start()
    try:
        prompt = [prefill.vocab.filler_token(i) for i in range(3 * BLOCK_TOKENS + 10)]
        result = await prefill.prefill("p1", prompt, None)
        handed = result.kv_transfer_params
        assert handed == {SIM_KV_TOKENS: 3 * BLOCK_TOKENS}
        assert result.first_token is not None and result.engine_s is not None
        cached, engine_s = 0, None
        async for delta in decode.generate(
            "d1", prompt, SamplingParams(max_tokens=3), [], kv_transfer_params=handed
        ):
            cached, engine_s = delta.cached_tokens, delta.engine_s or engine_s
    finally:
        prefill.shutdown()
        decode.shutdown()
    p = decode.profile
    rest = len(prompt) - 3 * BLOCK_TOKENS
    assert cached == 3 * BLOCK_TOKENS
    # The transfer, then one step that prefills the rest and emits, then two more steps.
    first_step = p.tpot_s(1) + p.prefill_fixed_s + rest * p.prefill_s_per_token
    expected = split.transfer_s(3 * BLOCK_TOKENS) + first_step + 2 * p.tpot_s(1)
    assert engine_s == pytest.approx(expected, abs=2e-3)


@pytest.fixture
async def sim_pair(nats_server: EmbeddedNats) -> AsyncIterator[dict[str, CloudWorker]]:
    """A simulated prefill worker and decode worker on the session's nats-server."""
    tag = uuid.uuid4().hex[:6]
    workers = {}
    vocab = None
    for role in ("prefill", "decode"):
        settings = CloudSettings.model_validate(
            {"nats_url": nats_server.url, "engine": "sim", "role": role, "http_port": 0,
             "worker_id": f"sim-{role}-{tag}"}
        )  # fmt: skip
        engine = SimVllmEngine(settings, vocab=vocab)
        await engine.start()
        vocab = engine.vocab
        workers[role] = CloudWorker(settings, engine)
        await workers[role].start()
    try:
        yield workers
    finally:
        for worker in workers.values():
            await worker.drain()
            worker.engine.shutdown()


async def _generate(url: str, model: str, words: int) -> TokenChunk:
    nc = await connect(url, name="sim-probe")
    inbox = nc.new_inbox()
    got: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        await got.put(TokenChunk.from_bytes(msg.data))

    async def on_alive(msg) -> None:  # type: ignore[no-untyped-def]
        await msg.respond(b"")  # still here: the worker's liveness probe

    try:
        await nc.subscribe(inbox, cb=on_chunk)
        await nc.subscribe(subjects.liveness(inbox), cb=on_alive)
        request = GenerateRequest(
            request_id=uuid.uuid4().hex, model=model, reply_subject=inbox,
            messages=[{"role": "user", "content": "word " * words}],
            sampling=SamplingParams(max_tokens=4),
        )  # fmt: skip
        reply = await nc.request(subjects.cloud_generate(model), request.to_bytes(), timeout=5)
        GenerateAccepted.from_bytes(reply.data)
        chunk = await asyncio.wait_for(got.get(), 10)
        while not chunk.is_end:
            chunk = await asyncio.wait_for(got.get(), 10)
        return chunk
    finally:
        await nc.close()


async def test_a_simulated_pair_prefills_long_prompts_remotely_under_the_default_threshold(
    nats_server: EmbeddedNats, sim_pair: dict[str, CloudWorker]
) -> None:
    decode, prefill = sim_pair["decode"], sim_pair["prefill"]
    model = decode.engine.pair.name
    short = await _generate(nats_server.url, model, 5)
    assert short.usage is not None and short.usage.cached_tokens == 0
    assert prefill.prefill_counts.served == 0  # under 512 uncached tokens: served locally
    long = await _generate(nats_server.url, model, 700)
    assert long.usage is not None and long.usage.simulated
    assert long.usage.worker_id == decode.settings.worker_id  # edges only see the decode one
    assert long.usage.cached_tokens == (long.usage.prompt_tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert prefill.prefill_counts.served == 1
    assert decode.prefill_counts.transferred == 1 and decode.prefill_counts.local == 1
    assert (decode.beat().worker_role, prefill.beat().worker_role) == ("decode", "prefill")
