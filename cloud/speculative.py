"""The accept/reject rule of speculative decoding, as pure functions.

The edge drafts tokens x_1..x_k with its model q; the cloud scores the same
positions with the target model p in one forward pass, which gives
p(. | prefix, x_<i) for i = 1..k+1. These functions decide how many drafts to
keep and which token follows them. No I/O here: NATS and vLLM wrap this.

Greedy (temperature 0): keep x_i while it is the target's argmax; at the first
mismatch emit the target's argmax instead; if all k match, emit the argmax of
position k+1 (the "bonus" token). The output is then exactly the target's
greedy output.

Sampling (Leviathan et al. 2023, Chen et al. 2023): keep x_i with probability
min(1, p(x_i) / q(x_i)). On the first rejection, sample the replacement from
the residual distribution norm(max(0, p - q)). If all k are kept, sample the
bonus token from p at position k+1. Each emitted token is then distributed
exactly as a sample from p: P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y)
= min(q(y), p(y)) + max(0, p(y) - q(y)) = p(y).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mesh.protocol import TokenLogprob


@dataclass(frozen=True)
class Verdict:
    """How many drafts the target keeps, and the token it adds after them.

    ``margins`` (greedy, when the scorer knows them): the target's top-1 minus top-2
    logprob at each draft position and at the next token's; a near-tie is a small one.
    """

    accepted: int
    next_token: int
    margins: tuple[float, ...] = ()
    # The target's logprobs of the accepted drafts and the next token, when asked for.
    logprobs: tuple[TokenLogprob, ...] | None = None


def verify_greedy(draft: list[int], target_argmax: list[int]) -> Verdict:
    """Greedy rule; ``target_argmax`` has k+1 entries (one per draft, then the bonus)."""
    assert len(target_argmax) == len(draft) + 1, "need one target token per draft plus one"
    for i, token in enumerate(draft):
        if token != target_argmax[i]:
            return Verdict(accepted=i, next_token=target_argmax[i])
    return Verdict(accepted=len(draft), next_token=target_argmax[len(draft)])


def verify_sampled(
    draft: list[int],
    draft_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator | Sequence[np.random.Generator],
) -> Verdict:
    """Rejection-sampling rule.

    ``draft_probs`` is k x V (q at each drafted position); ``target_probs`` is
    (k+1) x V (p at each drafted position and at the bonus position). Rows must
    be probability distributions (temperature and top-p already applied). ``rng``
    is one generator, or one per position (k+1), so that a seeded answer draws the
    same numbers at a position however its drafts were grouped into rounds.
    """
    k = len(draft)
    assert draft_probs.shape[0] == k and target_probs.shape[0] == k + 1
    rngs = [rng] * (k + 1) if isinstance(rng, np.random.Generator) else list(rng)
    assert len(rngs) == k + 1, "need one generator per draft plus one"
    for i, token in enumerate(draft):
        p, q = target_probs[i, token], draft_probs[i, token]
        # Accept with probability min(1, p/q); q > 0 because the draft sampled it.
        if rngs[i].random() * q < p:
            continue
        residual = np.maximum(target_probs[i] - draft_probs[i], 0.0)
        total = residual.sum()
        # total == 0 only if p == q everywhere, where rejection has probability 0.
        dist = residual / total if total > 0 else target_probs[i]
        return Verdict(accepted=i, next_token=int(rngs[i].choice(len(dist), p=dist)))
    bonus = target_probs[k]
    return Verdict(accepted=k, next_token=int(rngs[k].choice(len(bonus), p=bonus)))
