"""What a benchmark session is: a script that talks to an LLM through one call function.

A workload makes sessions; a session plays one agentic interaction by calling
``call(messages, tools)`` as often as it needs (the runner decides which route
serves each call and times it). Sessions never see HTTP, modes or timing: the
same session script runs unchanged in every mode, which is what makes the
modes comparable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]
Tool = dict[str, Any]


@dataclass(frozen=True)
class ToolCallOut:
    """One tool call the model made: a name and its JSON arguments as sent."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Reply:
    """What one LLM call answered."""

    content: str
    tool_calls: tuple[ToolCallOut, ...] = ()


class LlmCall(Protocol):
    """The runner's call function: one chat completion, timed and recorded.

    ``expects_call`` marks a step whose ground truth is a tool call (BFCL): the
    runner's enforced pass sends that step with ``tool_choice: "required"``.
    """

    async def __call__(
        self, messages: list[Message], tools: list[Tool] | None, expects_call: bool = False
    ) -> Reply: ...


@dataclass(frozen=True)
class CallCheck:
    """How one model step compared with the ground truth's expected call (BFCL)."""

    valid: bool  # parsed into a call of an offered tool with a JSON-object argument list
    correct: bool  # valid, and the same name and arguments as the expected call


@dataclass
class SessionOutcome:
    """What a session learned about answer quality while it played."""

    checks: list[CallCheck] = field(default_factory=list)


class Session(Protocol):
    """One agentic interaction; ``key`` names it identically in every mode."""

    @property
    def workload(self) -> str: ...

    @property
    def key(self) -> str: ...

    async def play(self, call: LlmCall) -> SessionOutcome: ...


class Workload(Protocol):
    """A source of sessions."""

    name: str

    def sessions(self, count: int, rng: random.Random) -> Sequence[Session]: ...


def interleave(workloads: list[Workload], count: int, seed: int) -> list[Session]:
    """``count`` sessions drawn round-robin from the workloads, reproducible from ``seed``."""
    rng = random.Random(seed)
    share = [count // len(workloads) + (i < count % len(workloads)) for i in range(len(workloads))]
    per_workload = [w.sessions(n, rng) for w, n in zip(workloads, share, strict=True)]
    out: list[Session] = []
    for i in range(max(share, default=0)):
        out += [sessions[i] for sessions in per_workload if i < len(sessions)]
    return out
