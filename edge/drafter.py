"""The edge's half of speculative decoding: draft greedily on llama.cpp, let the cloud verify.

Runs in an engine slot's thread (it owns the llama.cpp context), or on the batched engine in a
thread of its own whose evaluations join the shared decode steps (``edge.batched_engine``):

1. bring the KV cache to the prompt (reusing the longest cached prefix);
2. draft up to ``k`` tokens greedily, evaluating each so the next can be drafted;
3. send context + drafts to a cloud worker (``verify``), which keeps the drafts
   its target model agrees with and adds its own next token;
4. pipelining: while that verification is in flight (the round trip runs on the
   event loop), go on drafting the block after it as if every draft were
   accepted; the first token of that block is the draft model's guess of the
   target's next token;
5. when the verdict arrives: if every draft was accepted and the target's next
   token equals the guess, the block drafted ahead is already in the KV cache
   and is the next draft, sent at once. Otherwise roll the KV cache back to the
   accepted drafts (llama.cpp drops the rest, the block ahead included) and
   evaluate the target's token, so the next draft continues from the target's
   sequence. Either way the output is the cloud model's greedy output.

Sampling (temperature > 0): each draft token is sampled from the draft model's
``top_k_distribution`` (temperature, top-``DRAFT_TOP_K``, top-p), and that distribution q travels
with the draft; the worker applies the rejection-sampling rule against the target's
distribution and returns how many it keeps plus a token sampled from the right
distribution, so the edge goes on exactly as in the greedy case.

The draft length adapts: it grows while whole drafts are accepted and shrinks
to just past the accepted run when they are not, between ``min_k`` and ``max_k``;
while drafts are accepted it never drops below the tokens the edge can draft in
one verification round trip, so pipelining has a block to hide the round trip behind.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec

import numpy as np

from edge.errors import EngineError
from edge.escalation import last_logits
from edge.generation import GenerationRequest
from edge.sessions import common_prefix_len
from edge.text import TextAssembler
from mesh.protocol import DraftDistribution, TokenLogprob
from mesh.sampling import DRAFT_TOP_K, top_k_distribution

if TYPE_CHECKING:
    from edge.batched_engine import SequenceRun
    from edge.engine import SlotRun

logger = logging.getLogger(__name__)
P = ParamSpec("P")

# How a drafter picks the token at an absolute position from the logits there: the
# token, and for sampled drafting the distribution it was sampled from.
Pick = Callable[[np.ndarray, int], tuple[int, DraftDistribution | None]]


@dataclass
class Draft:
    """Drafted tokens and, when sampling, the distribution each was sampled from."""

    tokens: list[int] = field(default_factory=list)
    distributions: list[DraftDistribution] | None = None

    def add(self, token: int, distribution: DraftDistribution | None) -> None:
        """Append one drafted token."""
        self.tokens.append(token)
        if distribution is not None:
            self.distributions = [*(self.distributions or []), distribution]

    def after(self, n: int) -> Draft:
        """The drafts past the first ``n``."""
        rest = None if self.distributions is None else self.distributions[n:]
        return Draft(self.tokens[n:], rest)

    def evaluated(self, is_eog: Callable[[int], bool]) -> int:
        """How many of the tokens are in the KV cache: all but a final end token."""
        return len(self.tokens) - (1 if self.tokens and is_eog(self.tokens[-1]) else 0)

    def __len__(self) -> int:
        return len(self.tokens)


class Confirmed(NamedTuple):
    """The target's verdict on a draft: how many drafts it keeps, the token it adds, and
    (when the request asks for them) its logprobs of those accepted + 1 tokens."""

    accepted: int
    next_token: int
    logprobs: list[TokenLogprob] | None = None


# (context token ids, draft) -> a future of the target's verdict. It returns at
# once: the round trip runs elsewhere while the slot drafts ahead.
Verifier = Callable[[list[int], Draft], "Future[Confirmed]"]


def greedy_pick(logits: np.ndarray, position: int) -> tuple[int, DraftDistribution | None]:
    """The argmax token (greedy drafting sends no distribution)."""
    return int(logits.argmax()), None


def sampled_pick(temperature: float, top_p: float, seed: int | None) -> Pick:
    """Sample from the draft's ``top_k_distribution`` and keep that distribution as q.

    With a seed, the draw at each position comes from its own stream (seed, position):
    how many tokens a pipelined block drafts depends on timing, and must not shift
    which random numbers later positions see (replay is still best effort: timing
    also decides which positions the cloud samples as bonus tokens).
    """
    shared = np.random.default_rng()

    def pick(logits: np.ndarray, position: int) -> tuple[int, DraftDistribution | None]:
        rng = shared if seed is None else np.random.default_rng([seed, position, 0])
        ids, probs = top_k_distribution(
            np.arange(len(logits)), logits, temperature, top_p, DRAFT_TOP_K
        )
        token = int(ids[rng.choice(len(ids), p=probs)])
        return token, DraftDistribution(token_ids=ids.tolist(), probs=probs.tolist())

    return pick


@dataclass
class DraftLength:
    """Adaptive number of tokens to draft per verification round."""

    k: int = 4
    min_k: int = 1
    max_k: int = 16

    def __post_init__(self) -> None:
        self.k = max(self.min_k, min(self.k, self.max_k))

    def update(
        self, drafted: int, accepted: int, round_trip_s: float = 0.0, token_s: float = 0.0
    ) -> None:
        """All accepted: draft more next time; otherwise aim just past the accepted run.

        ``round_trip_s`` is how long the verification took as the edge saw it and
        ``token_s`` the edge's time to draft one token: while drafts are accepted,
        ``k`` stays at or above their ratio, so the next block takes a round trip to
        draft and the edge is never idle waiting for a verdict.
        """
        if accepted < drafted:
            self.k = max(self.min_k, min(self.k, accepted + 1))
            return
        self.k = min(self.max_k, self.k + 2)
        if token_s > 0:
            self.k = max(self.k, min(self.max_k, math.ceil(round_trip_s / token_s)))


def prefill(llama: Any, prompt: list[int]) -> int:
    """Evaluate the prompt, reusing the KV cache's common prefix; returns the tokens reused."""
    keep = min(common_prefix_len(np.asarray(llama._input_ids), prompt), len(prompt) - 1)
    llama.n_tokens = keep  # eval() drops KV past n_tokens before it evaluates
    llama.eval(prompt[keep:])
    return keep


def draft_block(
    llama: Any,
    k: int,
    is_eog: Callable[[int], bool],
    pick: Pick = greedy_pick,
    stop: Callable[[Draft], bool] | None = None,
) -> Draft:
    """Up to ``k`` tokens from the current logits on, each chosen by ``pick``.

    Every token is evaluated except an end token, after which nothing is drafted;
    ``stop(draft)``, asked after each token, ends the block early.
    """
    draft = Draft()
    for _ in range(k):
        logits = last_logits(llama)
        draft.add(*pick(logits, llama.n_tokens))
        token = draft.tokens[-1]
        if is_eog(token):
            break  # nothing follows an end token; it is not evaluated
        llama.eval([token])
        if stop is not None and stop(draft):
            break
    return draft


def draft_ahead(
    llama: Any,
    draft: Draft,
    limit: int,
    is_eog: Callable[[int], bool],
    pick: Pick,
    pending: Future[Confirmed],
) -> Draft:
    """Draft the block after ``draft`` while its verification is ``pending``.

    The block assumes every draft is accepted; its first token is the guess of the
    target's next token. Drafting stops as soon as a verdict proves the guess wrong
    (at most one token is wasted after the verdict arrives), and not before
    ``limit`` otherwise: a block whose guess holds becomes the next draft.
    """
    if limit < 2 or not draft.tokens or is_eog(draft.tokens[-1]):
        return Draft()  # no room for a next draft, or the draft model ended the answer

    def disproved(ahead: Draft) -> bool:
        if not pending.done():
            return False
        if pending.exception() is not None:
            return True
        verdict = pending.result()
        return verdict.accepted < len(draft) or verdict.next_token != ahead.tokens[0]

    return draft_block(llama, limit, is_eog, pick, stop=disproved)


def continues(draft: Draft, ahead: Draft, accepted: int, next_token: int) -> bool:
    """Whether the block drafted ahead is still valid after the verdict."""
    return accepted == len(draft) and ahead.tokens[:1] == [next_token]


def rollback(llama: Any, context_len: int, accepted: int) -> None:
    """Keep the KV of the context and the accepted drafts; the next eval overwrites the rest.

    The logits now belong to a dropped token: flag them stale, or llama-cpp-python's
    ``generate`` (the edge fallback) would sample from them when the context it is
    given is exactly the kept one.
    """
    llama.n_tokens = context_len + accepted
    llama._requires_eval = True


class DraftTimer:
    """The edge's recent time to draft one token (an exponential moving average)."""

    def __init__(self, weight: float = 0.3) -> None:
        self._weight = weight
        self.token_s = 0.0

    def draft(self, work: Callable[P, Draft], *args: P.args, **kwargs: P.kwargs) -> Draft:
        """Run a drafting call and fold its per-token time into the average."""
        started = time.perf_counter()
        tokens = work(*args, **kwargs)
        if tokens:
            sample = (time.perf_counter() - started) / len(tokens)
            self.token_s = (
                sample
                if not self.token_s
                else (self._weight * sample + (1 - self._weight) * self.token_s)
            )
        return tokens


@dataclass(frozen=True)
class SpeculativeDecoder:
    """The speculative route's decode loop (steps 1-5 above) on an engine slot.

    ``fallback_to_edge``: when a verification fails mid-answer, the edge finishes the
    answer alone (marked ``fell_back``) instead of failing it; the route plan says which.
    """

    verifier: Verifier
    max_draft_tokens: int = 16
    fallback_to_edge: bool = True

    def run(self, run: SlotRun | SequenceRun) -> str:
        """Draft on llama.cpp, verify in the cloud, emit what the target confirms."""
        llama, params, stats = run.llama, run.request.sampling, run.stats
        assembler = TextAssembler(params.stop)
        budget = min(params.max_tokens, run.n_ctx - len(run.request.prompt_tokens))
        context = list(run.request.prompt_tokens)
        prefill(llama, context)
        pick = (
            greedy_pick
            if params.greedy
            else sampled_pick(params.temperature, params.top_p, params.seed)
        )
        length, timer = DraftLength(max_k=self.max_draft_tokens), DraftTimer()
        draft = timer.draft(draft_block, llama, max(1, min(length.k, budget - 1)), run.is_eog, pick)
        while True:
            if run.cancelled():
                return assembler.finish()
            room = budget - stats.completion_tokens  # >= 1: the target adds one token
            pending, round_trip = _send_for_verification(self.verifier, context, draft)
            limit = min(length.k + 1, room - len(draft) - 1)
            ahead = timer.draft(draft_ahead, llama, draft, limit, run.is_eog, pick, pending)
            try:
                accepted, next_token, logprobs = _checked(pending.result(), draft, run.n_vocab)
            except Exception as exc:
                if not self.fallback_to_edge:
                    raise
                logger.warning("verification failed (%s); finishing on the edge", exc)
                stats.fell_back = True
                rollback(llama, len(context), 0)
                rest = GenerationRequest(
                    context, replace(params, max_tokens=room), cancel=run.request.cancel
                )
                return assembler.finish() + run.decode(rest)
            stats.drafted += len(draft)
            stats.accepted += accepted
            stats.verify_rounds += 1
            length.update(len(draft), accepted, round_trip(), timer.token_s)
            kept = continues(draft, ahead, accepted, next_token)
            if not kept:
                # Drops the block ahead too. A draft ending on an end token never evaluated
                # it: counting it would leave n_tokens past the KV, and the next prompt that
                # repeats it (a conversation's next turn) would fail in llama_decode (-1).
                rollback(llama, len(context), min(accepted, draft.evaluated(run.is_eog)))
            for i, token in enumerate([*draft.tokens[:accepted], next_token]):
                reason = run.accept(token, assembler, budget, logprobs[i] if logprobs else None)
                if reason is not None:
                    stats.finish_reason = reason
                    return assembler.finish()
                context.append(token)
            if kept and len(ahead) > 1:
                draft = ahead.after(1)  # drafted during the round trip; already evaluated
                stats.pipelined_rounds += 1
                continue
            if not kept:
                llama.eval([next_token])  # the next draft continues from the target's token
            k = max(1, min(length.k, budget - stats.completion_tokens - 1))
            draft = timer.draft(draft_block, llama, k, run.is_eog, pick)


def _checked(verdict: Confirmed, draft: Draft, n_vocab: int) -> Confirmed:
    """The verdict, if it can belong to this draft: a token outside the vocabulary
    would crash llama.cpp, so such a reply counts as a failed verification."""
    accepted, next_token, logprobs = verdict
    if not (0 <= accepted <= len(draft) and 0 <= next_token < n_vocab):
        raise EngineError(f"verify reply out of range: {accepted} accepted, {next_token}")
    if logprobs is not None and len(logprobs) != accepted + 1:
        raise EngineError(f"verify reply has {len(logprobs)} logprobs for {accepted + 1} tokens")
    return verdict


def _send_for_verification(
    verifier: Verifier, context: list[int], draft: Draft
) -> tuple[Future[Confirmed], Callable[[], float]]:
    """Start a verification; also a function giving its round trip once it is done."""
    sent = time.perf_counter()
    arrived: list[float] = []
    pending = verifier(list(context), draft)
    pending.add_done_callback(lambda _: arrived.append(time.perf_counter()))
    return pending, lambda: (arrived[0] if arrived else time.perf_counter()) - sent
