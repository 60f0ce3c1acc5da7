"""The accept/reject rule: exact at temperature 0, distribution-preserving when sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud.speculative import Verdict, verify_greedy, verify_sampled
from mesh.errors import ProtocolError
from mesh.protocol import DraftDistribution, SamplingParams, VerifyRequest
from mesh.sampling import top_k_distribution


def test_greedy_accepts_matching_prefix_and_corrects_the_first_mismatch() -> None:
    assert verify_greedy([5, 6, 7], [5, 6, 9, 1]) == Verdict(accepted=2, next_token=9)
    assert verify_greedy([5, 6, 7], [4, 6, 7, 1]) == Verdict(accepted=0, next_token=4)


def test_greedy_all_accepted_adds_the_bonus_token() -> None:
    assert verify_greedy([5, 6], [5, 6, 8]) == Verdict(accepted=2, next_token=8)
    assert verify_greedy([], [3]) == Verdict(accepted=0, next_token=3)


def _random_dist(rng: np.random.Generator, v: int, sharp: float) -> np.ndarray:
    logits = rng.normal(size=v) * sharp
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_identical_models_accept_everything() -> None:
    rng = np.random.default_rng(0)
    p = np.stack([_random_dist(rng, 8, 2.0) for _ in range(4)])
    draft = [int(rng.choice(8, p=p[i])) for i in range(3)]
    assert verify_sampled(draft, p[:3], p, rng).accepted == 3


def test_sampled_output_follows_the_target_distribution() -> None:
    """First emitted token over many trials ~ p (chi-square), though drafts come from q."""
    rng = np.random.default_rng(1234)
    vocab, trials = 6, 40_000
    p = _random_dist(rng, vocab, 1.5)
    q = _random_dist(rng, vocab, 1.5)
    counts = np.zeros(vocab)
    for _ in range(trials):
        x = int(rng.choice(vocab, p=q))
        verdict = verify_sampled([x], q[None, :], np.stack([p, p]), rng)
        counts[x if verdict.accepted == 1 else verdict.next_token] += 1
    # Pearson's chi-square with vocab-1 = 5 degrees of freedom; 20.52 is its 99.9% quantile.
    assert _chi_square(counts, p * trials) < 20.52, (counts / trials, p)
    # And the draft's distribution is clearly not what comes out.
    assert _chi_square(counts, q * trials) > 100


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_acceptance_rate_matches_theory() -> None:
    """P(accept) = sum_x min(p(x), q(x))."""
    rng = np.random.default_rng(7)
    p, q = _random_dist(rng, 10, 1.0), _random_dist(rng, 10, 1.0)
    trials = 20_000
    accepted = sum(
        verify_sampled([int(rng.choice(10, p=q))], q[None, :], np.stack([p, p]), rng).accepted
        for _ in range(trials)
    )
    expected = np.minimum(p, q).sum()
    assert abs(accepted / trials - expected) < 4 * np.sqrt(expected * (1 - expected) / trials)


def test_top_k_distribution_is_tempered_truncated_and_nucleus_cut() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0, 3.0])
    ids, probs = top_k_distribution(np.arange(5) + 100, logits, 0.5, 1.0, 3)
    assert ids.tolist() == [104, 100, 101]  # the top 3, most probable first
    expected = np.exp(np.array([3.0, 2.0, 1.0]) / 0.5)
    assert np.allclose(probs, expected / expected.sum())
    # Top-p keeps tokens while the mass before them is below p: 0.867 < 0.95 keeps two.
    ids, probs = top_k_distribution(np.arange(5), logits, 0.5, 0.95, 3)
    assert ids.tolist() == [4, 0] and np.isclose(probs.sum(), 1.0)
    # Temperature divides logprobs as it divides logits: the normalizer cancels.
    logprobs = logits - np.log(np.exp(logits).sum())
    same = top_k_distribution(np.arange(5), logprobs, 0.7, 0.9, 4)
    assert np.allclose(same[1], top_k_distribution(np.arange(5), logits, 0.7, 0.9, 4)[1])


def test_sampled_verification_wants_one_draft_distribution_per_draft_token() -> None:
    q = DraftDistribution(token_ids=[5, 9], probs=[0.75, 0.25])
    fields = {"request_id": "r", "model": "m", "context_token_ids": [1, 2]}
    hot = SamplingParams(temperature=0.8)
    ok = VerifyRequest(**fields, draft_token_ids=[9], sampling=hot, draft_distributions=[q])
    assert ok.sampled and ok.draft_distributions == [q]
    greedy = VerifyRequest(**fields, draft_token_ids=[9], sampling=SamplingParams(temperature=0))
    assert not greedy.sampled
    hot_wire, q_wire = hot.model_dump(), [q.model_dump()]
    for bad in (
        {"draft_token_ids": [9], "sampling": hot_wire},  # no q
        {"draft_token_ids": [7], "sampling": hot_wire, "draft_distributions": q_wire},  # 7 not in q
        {"draft_token_ids": [9, 5], "sampling": hot_wire, "draft_distributions": q_wire},  # short
        {"draft_token_ids": [9], "draft_distributions": q_wire},  # q without sampling
    ):
        with pytest.raises(ProtocolError):
            VerifyRequest.from_bytes(json.dumps({**fields, **bad}))
    with pytest.raises(ValueError):
        DraftDistribution(token_ids=[1, 2], probs=[0.5, 0.4])  # not a distribution


def test_per_position_generators_make_the_verdict_independent_of_round_grouping() -> None:
    """A seeded answer replays whatever rounds its drafts came in: position i draws from
    its own generator, so verifying [a, b] at once or [a] then [b] decides alike."""
    rng = np.random.default_rng(5)
    vocab = 7
    p = np.stack([_random_dist(rng, vocab, 1.0) for _ in range(3)])
    q = np.stack([_random_dist(rng, vocab, 1.0) for _ in range(2)])

    def streams(start: int, n: int) -> list[np.random.Generator]:
        return [np.random.default_rng([42, start + i, 1]) for i in range(n)]

    for a in range(vocab):
        for b in range(vocab):
            both = verify_sampled([a, b], q, p, streams(0, 3))
            first = verify_sampled([a], q[:1], np.stack([p[0], q[1]]), streams(0, 2))
            if first.accepted == 1:  # the same uniform decided position 0 both times
                assert both.accepted >= 1
            else:
                assert (both.accepted, both.next_token) == (0, first.next_token)
