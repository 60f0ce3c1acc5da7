"""The pipelined drafting loop on real llama.cpp, against a scripted target sequence.

The cloud's verify is replaced by the pure greedy rule (``cloud.speculative``)
applied to a fixed target token sequence, answering after a delay from another
thread, as a round trip would. The target is the draft model's own greedy answer
with tokens changed at chosen positions, so some drafts are accepted whole (and
the block drafted ahead is kept) and some are rejected (KV rollback). Whatever the
mix, the output must be exactly the target sequence. The end-to-end path with
real vLLM verification is in ``tests/cloud/test_cloud_route.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from cloud.speculative import verify_greedy
from edge.drafter import Confirmed, Draft, DraftLength, SpeculativeDecoder, Verifier
from edge.engine import LlamaEngine
from edge.generation import EngineConfig, FinishEvent, GenerationRequest, TokenEvent
from edge.sampling import SamplingParams
from models.bundled import locate_bundled_gguf

PROMPT = "<|im_start|>user\nList the numbers from 1 to 40, separated by commas.<|im_end|>\n"
PROMPT += "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    engine = LlamaEngine(EngineConfig(model_path=locate_bundled_gguf(), n_ctx=512))
    yield engine
    asyncio.run(engine.close())


class ScriptedTarget:
    """Greedy verification against a fixed target sequence, answering after ``delay_s``."""

    def __init__(self, prompt_len: int, target: list[int], delay_s: float) -> None:
        self.prompt_len, self.target, self.delay_s = prompt_len, target, delay_s
        self.pool = ThreadPoolExecutor(4)
        self.calls = 0

    def verify(self, context: list[int], block: Draft) -> Future[Confirmed]:
        self.calls += 1
        draft = block.tokens
        start = len(context) - self.prompt_len
        assert context[self.prompt_len :] == self.target[:start], "context left the target"
        wanted = self.target[start : start + len(draft) + 1]

        def answer() -> Confirmed:
            time.sleep(self.delay_s)
            verdict = verify_greedy(draft, wanted)
            return Confirmed(verdict.accepted, verdict.next_token)

        return self.pool.submit(answer)


async def _run(
    engine: LlamaEngine, prompt: list[int], max_tokens: int, verifier: Verifier | None
) -> tuple[list[int], FinishEvent]:
    request = GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    if verifier is not None:
        request.decoder = SpeculativeDecoder(verifier, fallback_to_edge=False)
    tokens: list[int] = []
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.extend(event.token_ids)
        else:
            return tokens, event
    raise AssertionError("no finish event")


@pytest.mark.timeout(120)
async def test_pipelined_speculation_emits_exactly_the_target_sequence(
    engine: LlamaEngine,
) -> None:
    prompt = engine.tokenize(PROMPT)
    own, _ = await _run(engine, prompt, 60, None)
    assert len(own) == 60
    target = list(own)
    for position in (7, 23, 24, 41):  # the target disagrees with the draft model here
        target[position] = (target[position] + 1) % engine.n_vocab
    scripted = ScriptedTarget(len(prompt), target, delay_s=0.03)
    tokens, finish = await _run(engine, prompt, 60, scripted.verify)
    stats = finish.stats
    assert tokens == target
    assert finish.stats.finish_reason == "length"
    assert stats.verify_rounds == scripted.calls
    assert stats.accepted < stats.drafted  # the changed positions were rejected...
    assert stats.pipelined_rounds >= 1  # ...and blocks drafted during round trips were kept
    assert stats.verify_rounds < 60 / 2  # several tokens per round trip


def test_draft_length_follows_acceptance_and_covers_the_round_trip() -> None:
    length = DraftLength(k=4, max_k=16)
    length.update(drafted=4, accepted=4)
    assert length.k == 6
    length.update(drafted=6, accepted=2)
    assert length.k == 3
    # 50 ms round trip, 5 ms per drafted token: draft at least 10 while they are accepted.
    length.update(drafted=3, accepted=3, round_trip_s=0.05, token_s=0.005)
    assert length.k == 10
    length.update(drafted=10, accepted=10, round_trip_s=1.0, token_s=0.005)
    assert length.k == 16
    length.update(drafted=16, accepted=0, round_trip_s=1.0, token_s=0.005)
    assert length.k == 1


@pytest.mark.timeout(120)
async def test_a_verdict_outside_the_vocabulary_is_a_failed_verification(
    engine: LlamaEngine,
) -> None:
    """Such a token would crash llama.cpp: the edge finishes the answer itself instead."""
    prompt = engine.tokenize(PROMPT)
    own, _ = await _run(engine, prompt, 12, None)
    pool = ThreadPoolExecutor(1)

    def corrupt(context: list[int], draft: Draft) -> Future[Confirmed]:
        return pool.submit(lambda: Confirmed(0, engine.n_vocab + 5))

    request = GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=0.0))
    request.decoder = SpeculativeDecoder(corrupt, fallback_to_edge=True)
    tokens: list[int] = []
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.extend(event.token_ids)
        else:
            finish = event
    assert finish.stats.fell_back and tokens == own


async def test_an_accepted_end_token_leaves_the_slot_consistent(engine: LlamaEngine) -> None:
    """A draft ending on the end token (never evaluated) that the target accepts: the slot
    must not count that token as cached. A next turn repeating it (with the token id left
    at that position by an earlier, longer prompt) failed with llama_decode -1."""
    prompt = engine.tokenize("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    own, finish = await _run(engine, prompt, 200, None)
    assert finish.stats.finish_reason == "stop"  # a short answer, ended by the model
    (end,) = engine.tokenize("<|im_end|>")
    follow = prompt + own + [end] + engine.tokenize("\n<|im_start|>user\nThanks<|im_end|>\n")
    await _run(engine, follow, 1, None)  # leaves the end token's id at its position
    target = ScriptedTarget(len(prompt), [*own, end, end], delay_s=0.0)
    spec, finish = await _run(engine, prompt, 200, target.verify)
    assert spec == own and finish.stats.finish_reason == "stop"
    again, finish = await _run(engine, follow, 4, None)  # the conversation's next turn
    assert len(again) == 4 and finish.stats.finish_reason == "length"
