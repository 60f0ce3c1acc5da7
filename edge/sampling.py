"""The engine-facing form of a request's sampling settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.protocol import OutputConstraint


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; built by the OpenAI request models."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    constraint: OutputConstraint | None = None  # JSON or enforced tool calls
    logprobs: int | None = None  # None: none; k: each token's logprob and its top k

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding."""
        return self.temperature == 0.0
