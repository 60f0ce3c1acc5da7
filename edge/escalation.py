"""Mid-answer escalation: notice when the edge model grows unsure of its own answer.

While the edge decodes, ``ConfidenceWatch`` keeps the log-probabilities the edge
model gave its chosen tokens over a sliding window. When their mean falls below
the policy's threshold, the engine stops before emitting the doubtful token and
the server continues the same answer on a stronger route (speculative or
cloud) from the tokens already sent: nothing restarts, the client sees one
answer, and ``usage.tandem.escalation`` records where and why it changed hands.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def last_logits(llama: Any) -> np.ndarray:
    """The logits llama.cpp sampled the latest token from (valid until the next eval).

    A batched engine's sequence (``edge.batched_engine.SequenceLlama``) keeps its own
    copy: the shared context's logits belong to whichever step ran last."""
    own = getattr(llama, "last_logits", None)
    if own is not None:
        return np.asarray(own())
    import llama_cpp

    return np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1), shape=(llama.n_vocab(),)
    )


@dataclass
class ConfidenceWatch:
    """A sliding mean of token log-probabilities against a threshold."""

    window: int
    min_mean_logprob: float
    after_tokens: int = 0
    _recent: deque[float] = field(init=False)
    triggered_mean: float | None = None

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.window)

    def observe(self, logprob: float, produced: int) -> bool:
        """Record the next token's logprob; True when the answer should change hands
        (``produced``: tokens already emitted, the new one not counted)."""
        self._recent.append(logprob)
        if len(self._recent) < self.window or produced < self.after_tokens:
            return False
        mean = sum(self._recent) / len(self._recent)
        if mean < self.min_mean_logprob:
            self.triggered_mean = mean
            return True
        return False
