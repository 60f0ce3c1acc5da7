"""The accept/reject rule: exact at temperature 0, distribution-preserving when sampling."""

from __future__ import annotations

import numpy as np

from cloud.speculative import Verdict, verify_greedy, verify_sampled


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
