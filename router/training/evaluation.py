"""How good a router is: ROC-AUC, and cost against quality, as RouteLLM reports routers.

A router sends each request to the edge or the cloud. Over a labelled set:

- **quality** = agreement with cloud-only answers: a request served by the
  cloud always matches; one served by the edge matches iff its label says the
  edge's greedy answer equals the cloud's.
- **cost** = share of cloud tokens: the prompt and answer tokens of the
  requests sent to the cloud, over those of all requests. The answer length
  is the edge's answer length (capped at the labelling `max_tokens`), equal
  to the cloud's whenever the two agree.

A scored router (the classifier) traces a curve by its threshold; the rules
family (tools -> cloud, prompt >= L tokens -> cloud, for every L) traces
another. `savings_at` compares them at equal quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Example:
    """One labelled request as a router sees it."""

    disagrees: bool
    cloud_tokens: int  # prompt + answer tokens if the cloud serves it
    prompt_tokens: int
    has_tools: bool


@dataclass(frozen=True)
class CurvePoint:
    """One routing operating point."""

    cloud_token_share: float
    cloud_request_share: float
    agreement: float
    threshold: float | None = None  # the classifier's threshold or the rule's L


def roc_auc(disagrees: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count half)."""
    y = np.asarray(disagrees, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("ROC-AUC needs both classes")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Average ranks over ties.
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def operating_point(
    examples: Sequence[Example],
    to_cloud: Sequence[bool] | np.ndarray,
    threshold: float | None = None,
) -> CurvePoint:
    """Cost and quality of one routing of `examples`."""
    cloud = np.asarray(to_cloud, dtype=bool)
    tokens = np.array([e.cloud_tokens for e in examples], dtype=np.float64)
    agree = np.array([not e.disagrees for e in examples]) | cloud
    return CurvePoint(
        cloud_token_share=float(tokens[cloud].sum() / tokens.sum()),
        cloud_request_share=float(cloud.mean()),
        agreement=float(agree.mean()),
        threshold=threshold,
    )


def classifier_curve(
    examples: Sequence[Example], scores: Sequence[float] | np.ndarray
) -> list[CurvePoint]:
    """Every operating point of `score > threshold -> cloud`, all-edge to all-cloud."""
    s = np.asarray(scores, dtype=np.float64)
    # Distinct scores, highest first; `s > next lower score` sends a whole tie group.
    levels = sorted(set(s.tolist()), reverse=True)
    thresholds = [*levels, -1.0]
    return [operating_point(examples, s > t, t) for t in thresholds]


def rules_curve(examples: Sequence[Example], tools_to_cloud: bool = True) -> list[CurvePoint]:
    """Every operating point of `(tools ->) cloud, prompt >= L -> cloud`, for every L."""
    lengths = np.array([e.prompt_tokens for e in examples])
    tools = np.array([e.has_tools for e in examples]) & tools_to_cloud
    cuts = sorted({*lengths.tolist(), int(lengths.max()) + 1})
    return [operating_point(examples, tools | (lengths >= cut), float(cut)) for cut in cuts]


def short_first_curve(examples: Sequence[Example]) -> list[CurvePoint]:
    """Every operating point of `prompt < L -> cloud`: a sanity check, not a policy.

    Agreement counts requests while cost counts tokens, so sending the shortest
    prompts to the cloud buys agreement at the lowest token price. A router
    that beats the rules only by preferring short prompts would show it here.
    """
    lengths = np.array([e.prompt_tokens for e in examples])
    cuts = sorted({*lengths.tolist(), int(lengths.max()) + 1})
    return [operating_point(examples, lengths < cut, float(cut)) for cut in cuts]


def rules_frontier(examples: Sequence[Example]) -> list[CurvePoint]:
    """The rules-only family: length cut-offs with and without `tools -> cloud`."""
    return rules_curve(examples, True) + rules_curve(examples, False)


def cheapest_at(
    curve: Sequence[CurvePoint], agreement: float, by_requests: bool = False
) -> CurvePoint | None:
    """The lowest-cost point reaching `agreement` (cost in tokens, or in requests)."""
    reaching = [p for p in curve if p.agreement >= agreement - 1e-12]
    if not reaching:
        return None
    if by_requests:
        return min(reaching, key=lambda p: p.cloud_request_share)
    return min(reaching, key=lambda p: p.cloud_token_share)


@dataclass(frozen=True)
class Savings:
    """Cloud tokens saved by the classifier against the rules at one quality level."""

    agreement: float
    classifier: CurvePoint
    rules: CurvePoint

    @property
    def saved_share(self) -> float:
        """Share of the rules' cloud tokens the classifier does not send (negative: costs more)."""
        if self.rules.cloud_token_share == 0:
            return 0.0
        return 1.0 - self.classifier.cloud_token_share / self.rules.cloud_token_share


def savings_at(
    classifier: Sequence[CurvePoint], rules: Sequence[CurvePoint], agreement: float
) -> Savings | None:
    """The classifier against the cheapest rule at equal agreement with cloud-only answers."""
    ours, theirs = cheapest_at(classifier, agreement), cheapest_at(rules, agreement)
    if ours is None or theirs is None:
        return None
    return Savings(agreement, ours, theirs)
