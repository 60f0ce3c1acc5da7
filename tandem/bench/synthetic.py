"""A synthetic agent for sweeps: a fixed number of steps, tool latency, think time, prompt growth.

Each session opens with a task, then repeats: call the model, wait the tool's
latency, append the model's answer and an observation of ``growth_words``
seeded pseudo-words (the prompt grows as an agent's does when tools return
data), and every ``steps_per_turn`` steps wait the user's think time. Growth
past the policy's long-context threshold moves a hybrid session to the cloud
mid-way, as a real agent's would.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from tandem.bench.workloads import LlmCall, Message, SessionOutcome

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ne", "di", "pa", "gor", "el")
_TASKS = (
    "Plan a three-day trip and keep a running list of bookings.",
    "Track the files of a small project and report what changed.",
    "Watch three stock prices and say when to sell.",
    "Sort the support tickets by urgency and summarize each.",
)


@dataclass(frozen=True)
class SyntheticAgent:
    """The shape of every synthetic session."""

    steps: int = 4
    steps_per_turn: int = 2
    tool_latency_s: float = 0.05
    think_time_s: float = 0.2
    growth_words: int = 60


def _observation(rng: random.Random, words: int) -> str:
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(words)
    )


@dataclass(frozen=True)
class SyntheticSession:
    """One synthetic agent run; its text is fixed by ``seed``, so every mode sends the same."""

    index: int
    seed: int
    agent: SyntheticAgent
    workload: str = "synthetic"

    @property
    def key(self) -> str:
        """Index and seed: the same session in every mode."""
        return f"synthetic:{self.index}:{self.seed}"

    async def play(self, call: LlmCall) -> SessionOutcome:
        """Run ``agent.steps`` model calls with tool waits and think pauses between them."""
        rng = random.Random(self.seed)
        messages: list[Message] = [{"role": "user", "content": rng.choice(_TASKS)}]
        for step in range(self.agent.steps):
            reply = await call(messages, None)
            await asyncio.sleep(self.agent.tool_latency_s)
            observation = _observation(rng, self.agent.growth_words)
            messages += [
                {"role": "assistant", "content": reply.content},
                {"role": "user", "content": f"Observation {step + 1}: {observation}. Go on."},
            ]
            if (step + 1) % self.agent.steps_per_turn == 0:
                await asyncio.sleep(self.agent.think_time_s)
        return SessionOutcome()


@dataclass
class SyntheticWorkload:
    """Synthetic agent sessions, each with its own text seed drawn from the run's seed."""

    agent: SyntheticAgent = SyntheticAgent()
    name: str = "synthetic"

    def sessions(self, count: int, rng: random.Random) -> list[SyntheticSession]:
        """``count`` sessions with seeds drawn from ``rng``."""
        return [SyntheticSession(i, rng.randrange(2**31), self.agent) for i in range(count)]
