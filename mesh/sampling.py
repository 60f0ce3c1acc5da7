"""The sampling distribution both ends of sampled speculative decoding compute.

The edge drafts from it and sends it (``DraftDistribution``); the worker builds
the target's from vLLM's logprobs with the same function, so the two sides of
the rejection-sampling rule are truncated the same way. Pure maths: no I/O.

Sampled speculation truncates both distributions to their most probable tokens. The
draft's q is exact whatever its width (the edge samples from the truncated q it
sends), so a narrow one only costs acceptance and bytes. The target's is the
approximation: vLLM gives at most ``max_logprobs`` prompt logprobs per position,
and every one is a Python object, so it is wide but finite (see docs/architecture.md
for the probability mass this leaves out).
"""

from __future__ import annotations

import numpy as np

DRAFT_TOP_K = 20
TARGET_TOP_K = 128


def top_k_distribution(
    token_ids: np.ndarray, scores: np.ndarray, temperature: float, top_p: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sampling distribution of speculative decoding at one position, on both sides.

    ``scores`` are logits or logprobs of ``token_ids`` (any additive constant cancels).
    Temperature divides them, as in softmax(logits / T); only the ``k`` highest-scoring
    tokens keep probability (top-k after temperature equals top-k before: the order
    does not change), renormalized; then top-p keeps the fewest most probable tokens
    whose mass reaches ``top_p``, as vLLM does. The edge drafts from exactly this
    distribution of its own logits (``DRAFT_TOP_K``); the worker builds the target's from
    vLLM's top ``TARGET_TOP_K`` logprobs: the tail beyond them is the one approximation.
    """
    assert temperature > 0 and 0 < top_p <= 1
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    scaled = scores[top].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1:
        # Keep a token while the mass before it is below top_p (the first always stays).
        keep = (np.cumsum(probs) - probs) < top_p
        probs = probs[keep] / probs[keep].sum()
        top = top[keep]
    # Tokens that underflowed to probability 0 cannot be sampled: leave them out.
    positive = probs > 0
    return token_ids[top[positive]], probs[positive]


# OpenAI's bound on ``top_logprobs``; the edge, the cloud and the wire all keep to it.
MAX_TOP_LOGPROBS = 20


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[int], list[float]]:
    """The model's log-probability of ``token`` and its ``k`` most probable tokens'.

    ``logits`` are one position's raw logits: like vLLM's default (``raw_logprobs``),
    the values are the model's own distribution, before temperature, top-p or a
    grammar. Returns (logprob of token, top ids, top logprobs), most probable first.
    """
    scores = logits.astype(np.float64)
    log_z = float(scores.max()) + float(np.log(np.exp(scores - scores.max()).sum()))
    chosen = float(scores[token]) - log_z
    if k <= 0:
        return chosen, [], []
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return chosen, [int(i) for i in top], [float(scores[i]) - log_z for i in top]
