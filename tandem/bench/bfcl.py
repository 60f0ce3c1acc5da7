"""BFCL v4 multi-turn tool-use sessions, from the ``bfcl-eval`` package's data and simulators.

Each scenario of ``BFCL_v4_multi_turn_base.json`` is a user asking, turn by
turn, for work done with stateful tools (a file system, a trading bot, ...).
A session offers the tools (BFCL's schemas converted to JSON Schema), and per
user turn takes one model step per ground-truth call: the model's calls run
on BFCL's own simulator classes and their results go back as tool messages.
When a step yields no usable call, the step is recorded as invalid and the
ground-truth call runs instead, so the session progresses as the scenario
intends. Each turn ends with one more call for the model's answer in words.
Steps are marked ``expects_call``, so the runner can enforce a call on them
(``tool_choice: "required"``) while the answers in words stay free.

Fitting the default models' 2048-token context: a session offers the tools its
ground truth uses plus other tools of the same classes up to ``max_tool_chars``
of JSON, plays at most ``max_turns`` user turns, and cuts tool results to
``max_result_chars``. Scenarios whose needed tools alone exceed the budget
are skipped.

Calls are never ``eval``-ed (BFCL's own executor does): ground-truth call
strings are parsed with ``ast`` into literal arguments, and the model's calls
are JSON, so only the simulators' public methods ever run.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import inspect
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tandem.bench.errors import WorkloadDataError
from tandem.bench.workloads import CallCheck, LlmCall, Message, Reply, SessionOutcome, Tool

CATEGORY = "multi_turn_base"

# BFCL's parameter types that are not JSON Schema types.
_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "any": None}
_SCHEMA_KEYS = ("type", "description", "enum", "default", "properties", "items", "required")


def data_dir() -> Path:
    """``bfcl_eval/data`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadDataError("the BFCL data package is missing: install bfcl-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A BFCL parameter schema (``dict``, ``float``, ``tuple``...) as JSON Schema."""
    out: dict[str, Any] = {}
    for key in _SCHEMA_KEYS:
        if key not in schema:
            continue
        value = schema[key]
        if key == "type":
            mapped = _TYPE_MAP.get(value, value)
            if mapped is not None:  # "any": no type constraint at all
                out["type"] = mapped
        elif key == "properties":
            out["properties"] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = to_json_schema(value)
        else:
            out[key] = value
    return out


def to_openai_tool(doc: dict[str, Any]) -> Tool:
    """A BFCL function doc as an OpenAI ``tools`` entry (its ``response`` part dropped)."""
    return {
        "type": "function",
        "function": {
            "name": doc["name"],
            "description": doc.get("description", ""),
            "parameters": to_json_schema(doc["parameters"]),
        },
    }


@dataclass(frozen=True)
class GroundTruthCall:
    """A call of the ground truth: a function name and literal arguments."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> GroundTruthCall:
        """Parse ``"mv(source='a', destination='b')"`` without evaluating it."""
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise WorkloadDataError(f"not a plain function call: {text!r}")
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        return cls(node.func.id, args, kwargs)


@dataclass(frozen=True)
class Scenario:
    """One BFCL multi-turn scenario with its ground truth."""

    id: str
    turns: list[list[Message]]
    initial_config: dict[str, Any]
    involved_classes: list[str]
    excluded: list[str]
    ground_truth: list[list[GroundTruthCall]]


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


@cache
def load_scenarios(category: str = CATEGORY) -> tuple[Scenario, ...]:
    """Every scenario of a multi-turn category, joined with its ground truth."""
    root = data_dir()
    answers = {
        a["id"]: a["ground_truth"]
        for a in _json_lines(root / "possible_answer" / f"BFCL_v4_{category}.json")
    }
    return tuple(
        Scenario(
            id=e["id"],
            turns=e["question"],
            initial_config=e.get("initial_config", {}),
            involved_classes=e["involved_classes"],
            excluded=e.get("excluded_function", []),
            ground_truth=[[GroundTruthCall.parse(c) for c in turn] for turn in answers[e["id"]]],
        )
        for e in _json_lines(root / f"BFCL_v4_{category}.json")
    )


@cache
def function_docs(class_name: str) -> tuple[dict[str, Any], ...]:
    """BFCL's function docs of one simulator class."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = data_dir() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(_json_lines(path))


class Simulator:
    """BFCL's simulator instances of one scenario, reachable by function name."""

    def __init__(self, scenario: Scenario) -> None:
        from bfcl_eval.constants.executable_backend_config import (
            CLASS_FILE_PATH_MAPPING,
            STATELESS_CLASSES,
        )

        self._methods: dict[str, Any] = {}
        for class_name in scenario.involved_classes:
            module = importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name])
            instance = getattr(module, class_name)()
            if class_name not in STATELESS_CLASSES:
                config = copy.deepcopy(scenario.initial_config.get(class_name, {}))
                instance._load_scenario(config, long_context=False)
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self._methods[name] = method

    def has(self, name: str) -> bool:
        """Whether some simulator class offers ``name``."""
        return name in self._methods

    def keyword_args(self, call: GroundTruthCall) -> dict[str, Any]:
        """The call's arguments all by name (positional ones named from the signature)."""
        params = list(inspect.signature(self._methods[call.name]).parameters)
        return {**dict(zip(params, call.args, strict=False)), **call.kwargs}

    def execute(self, name: str, arguments: dict[str, Any]) -> str:
        """Run one call; the result as text, errors as BFCL words them (the session goes on)."""
        try:
            result = self._methods[name](**arguments)
        except Exception as exc:  # a simulator rejecting bad arguments is a normal result
            return f"Error during execution: {exc}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)


def _normalize(value: Any) -> Any:
    """Arguments compared as JSON would carry them (tuples as lists, 2 == 2.0)."""
    return json.loads(json.dumps(value))


def check_call(
    reply: Reply, offered: set[str], expected: dict[str, Any], expected_name: str
) -> tuple[CallCheck, dict[str, Any] | None]:
    """Judge the reply's first call against the expected one; its arguments if valid."""
    if not reply.tool_calls:
        return CallCheck(valid=False, correct=False), None
    first = reply.tool_calls[0]
    try:
        args = json.loads(first.arguments or "{}")
    except json.JSONDecodeError:
        return CallCheck(valid=False, correct=False), None
    if first.name not in offered or not isinstance(args, dict):
        return CallCheck(valid=False, correct=False), None
    correct = first.name == expected_name and _normalize(args) == _normalize(expected)
    return CallCheck(valid=True, correct=correct), args


@dataclass
class BfclSession:
    """One scenario played as an agent would: calls, tool results, an answer per turn."""

    scenario: Scenario
    tools: list[Tool]
    max_turns: int
    max_result_chars: int
    workload: str = "bfcl"

    @property
    def key(self) -> str:
        """The scenario id: the same session in every mode."""
        return f"bfcl:{self.scenario.id}"

    async def play(self, call: LlmCall) -> SessionOutcome:
        """Play up to ``max_turns`` user turns against a fresh simulator."""
        sim = Simulator(self.scenario)
        offered = {t["function"]["name"] for t in self.tools}
        outcome = SessionOutcome()
        messages: list[Message] = []
        for question, truth in list(
            zip(self.scenario.turns, self.scenario.ground_truth, strict=False)
        )[: self.max_turns]:
            messages += question
            for expected in truth:
                expected_args = sim.keyword_args(expected)
                reply = await call(messages, self.tools, expects_call=True)
                check, args = check_call(reply, offered, expected_args, expected.name)
                outcome.checks.append(check)
                if args is not None:  # the model's own call runs, right or wrong
                    messages += self._run_call(sim, reply.tool_calls[0].name, args, len(messages))
                else:  # unusable: record it, continue with the ground truth
                    messages += self._run_call(sim, expected.name, expected_args, len(messages))
            answer = await call(messages, self.tools)
            messages.append({"role": "assistant", "content": answer.content})
        return outcome

    def _run_call(
        self, sim: Simulator, name: str, args: dict[str, Any], position: int
    ) -> list[Message]:
        """Execute one call; the assistant's call and the tool's result as messages."""
        result = sim.execute(name, args)[: self.max_result_chars]
        # Ids from the position, not random: every mode sends the same conversation.
        call_id = f"call_{position}"
        function = {"name": name, "arguments": json.dumps(args)}
        return [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": call_id, "content": result},
        ]


def select_tools(scenario: Scenario, max_tool_chars: int, max_turns: int) -> list[Tool] | None:
    """The tools a session offers: the ones its played turns need, then others that fit.

    None when the needed tools alone exceed ``max_tool_chars`` of JSON.
    """
    docs = [
        d
        for c in scenario.involved_classes
        for d in function_docs(c)
        if d["name"] not in scenario.excluded
    ]
    needed = {c.name for turn in scenario.ground_truth[:max_turns] for c in turn}
    chosen = [to_openai_tool(d) for d in docs if d["name"] in needed]
    size = sum(len(json.dumps(t)) for t in chosen)
    if size > max_tool_chars:
        return None
    for doc in docs:
        if doc["name"] in needed:
            continue
        tool = to_openai_tool(doc)
        if size + len(json.dumps(tool)) <= max_tool_chars:
            chosen.append(tool)
            size += len(json.dumps(tool))
    return chosen


@dataclass
class BfclWorkload:
    """Sessions from BFCL v4 multi-turn scenarios that fit the context budget."""

    max_turns: int = 2
    max_tool_chars: int = 3000
    max_result_chars: int = 400
    name: str = "bfcl"

    def sessions(self, count: int, rng: random.Random) -> list[BfclSession]:
        """``count`` distinct fitting scenarios in a seeded random order."""
        scenarios = list(load_scenarios())
        rng.shuffle(scenarios)
        out: list[BfclSession] = []
        for scenario in scenarios:
            if len(out) == count:
                break
            tools = select_tools(scenario, self.max_tool_chars, self.max_turns)
            if tools is not None:
                out.append(BfclSession(scenario, tools, self.max_turns, self.max_result_chars))
        return out
