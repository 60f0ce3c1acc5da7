"""Workload loaders on the real public data: BFCL schemas and simulators, MT-Bench, synthetic."""

from __future__ import annotations

import json
import random

import pytest

from mesh.grammar import unsupported_keyword
from tandem.bench.bfcl import (
    BfclWorkload,
    GroundTruthCall,
    Simulator,
    check_call,
    load_scenarios,
    select_tools,
    to_json_schema,
    to_openai_tool,
)
from tandem.bench.errors import WorkloadDataError
from tandem.bench.mtbench import MtBenchWorkload, load_questions
from tandem.bench.synthetic import SyntheticAgent, SyntheticWorkload
from tandem.bench.workloads import Reply, ToolCallOut, interleave

JSON_SCHEMA_TYPES = {"object", "number", "integer", "string", "boolean", "array", "null"}


def _types(schema: object) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["type"]} if isinstance(schema.get("type"), str) else set()
        for value in schema.values():
            found |= _types(value)
        return found
    if isinstance(schema, list):
        return set().union(*(_types(v) for v in schema)) if schema else set()
    return set()


def test_bfcl_schema_types_map_to_json_schema() -> None:
    bfcl = {
        "type": "dict",
        "properties": {
            "a": {"type": "float", "description": "first"},
            "pair": {"type": "tuple", "items": {"type": "float"}},
            "opts": {"type": "dict", "properties": {"x": {"type": "integer", "default": 3}}},
            "whatever": {"type": "any", "description": "anything"},
            "kind": {"type": "string", "enum": ["a", "b"]},
        },
        "required": ["a"],
    }
    assert to_json_schema(bfcl) == {
        "type": "object",
        "properties": {
            "a": {"type": "number", "description": "first"},
            "pair": {"type": "array", "items": {"type": "number"}},
            "opts": {"type": "object", "properties": {"x": {"type": "integer", "default": 3}}},
            "whatever": {"description": "anything"},
            "kind": {"type": "string", "enum": ["a", "b"]},
        },
        "required": ["a"],
    }


def test_every_bfcl_tool_converts_to_openai_tools_with_json_schema_types() -> None:
    from tandem.bench.bfcl import function_docs

    classes = {c for s in load_scenarios() for c in s.involved_classes}
    tools = [to_openai_tool(d) for c in sorted(classes) for d in function_docs(c)]
    assert len(tools) > 100
    for tool in tools:
        assert tool["type"] == "function"
        assert tool["function"]["parameters"]["type"] == "object"
        assert "response" not in tool["function"]
        assert _types(tool["function"]["parameters"]) <= JSON_SCHEMA_TYPES, tool
        # tool_choice 'required' makes the parameters a grammar: none may be refused.
        assert unsupported_keyword(tool["function"]["parameters"]) is None, tool


def test_scenarios_join_their_ground_truth() -> None:
    scenarios = load_scenarios()
    assert len(scenarios) == 200
    first = next(s for s in scenarios if s.id == "multi_turn_base_0")
    assert first.involved_classes == ["TwitterAPI", "GorillaFileSystem"]
    assert len(first.turns) == len(first.ground_truth) == 4
    assert first.ground_truth[0][0] == GroundTruthCall("cd", (), {"folder": "document"})


def test_ground_truth_calls_parse_without_evaluation() -> None:
    call = GroundTruthCall.parse("sort('final_report.pdf', reverse=True)")
    assert call == GroundTruthCall("sort", ("final_report.pdf",), {"reverse": True})
    with pytest.raises(WorkloadDataError):
        GroundTruthCall.parse("os.system('ls')")  # an attribute call is not a tool call
    with pytest.raises(ValueError):
        GroundTruthCall.parse("mv(source=open('x'))")  # only literals are arguments


def test_simulator_executes_ground_truth_calls_and_keeps_state() -> None:
    scenario = next(s for s in load_scenarios() if s.id == "multi_turn_base_0")
    sim = Simulator(scenario)
    results = []
    for call in scenario.ground_truth[0]:  # cd document, mkdir temp, mv final_report.pdf temp
        results.append(sim.execute(call.name, sim.keyword_args(call)))
    assert all("Error" not in r for r in results), results
    assert json.loads(sim.execute("cd", {"folder": "temp"})) == {
        "current_working_directory": "temp"
    }
    assert "final_report.pdf" in sim.execute("ls", {})
    # Positional ground-truth arguments are named from the simulator's signature.
    assert sim.keyword_args(GroundTruthCall("sort", ("final_report.pdf",), {})) == {
        "file_name": "final_report.pdf"
    }
    assert sim.execute("cd", {"no_such_arg": 1}).startswith("Error during execution")


def test_a_fresh_simulator_starts_from_the_scenario_state() -> None:
    scenario = next(s for s in load_scenarios() if s.id == "multi_turn_base_0")
    used = Simulator(scenario)
    used.execute("cd", {"folder": "document"})
    used.execute("rm", {"file_name": "final_report.pdf"})
    fresh = Simulator(scenario)
    fresh.execute("cd", {"folder": "document"})
    assert "final_report.pdf" in fresh.execute("ls", {})


def test_check_call_judges_validity_and_exactness() -> None:
    offered = {"mv", "cd"}
    expected = {"source": "a", "destination": "b"}
    right = Reply("", (ToolCallOut("mv", '{"destination": "b", "source": "a"}'),))
    wrong_args = Reply("", (ToolCallOut("mv", '{"source": "a", "destination": "c"}'),))
    not_offered = Reply("", (ToolCallOut("rm", '{"file_name": "a"}'),))
    broken_json = Reply("", (ToolCallOut("mv", '{"source": '),))
    text_only = Reply("I moved it.")
    assert check_call(right, offered, expected, "mv")[0].correct
    valid, args = check_call(wrong_args, offered, expected, "mv")
    assert valid.valid and not valid.correct and args == {"source": "a", "destination": "c"}
    for reply in (not_offered, broken_json, text_only):
        check, args = check_call(reply, offered, expected, "mv")
        assert not check.valid and not check.correct and args is None
    # Numbers compare as JSON carries them: 2 and 2.0 are the same argument.
    assert check_call(Reply("", (ToolCallOut("cd", '{"n": 2}'),)), {"cd"}, {"n": 2.0}, "cd")[
        0
    ].correct


def test_tool_selection_offers_needed_tools_within_the_budget() -> None:
    scenario = next(s for s in load_scenarios() if s.id == "multi_turn_base_0")
    tools = select_tools(scenario, max_tool_chars=3000, max_turns=2)
    assert tools is not None
    names = {t["function"]["name"] for t in tools}
    needed = {c.name for turn in scenario.ground_truth[:2] for c in turn}
    assert needed <= names
    assert not names & set(scenario.excluded)
    assert sum(len(json.dumps(t)) for t in tools) <= 3000
    assert select_tools(scenario, max_tool_chars=100, max_turns=2) is None


def test_bfcl_workload_draws_distinct_fitting_scenarios_by_seed() -> None:
    workload = BfclWorkload(max_tool_chars=3000)
    a = workload.sessions(5, random.Random(1))
    b = workload.sessions(5, random.Random(1))
    assert [s.key for s in a] == [s.key for s in b]
    assert len({s.key for s in a}) == 5
    assert [s.key for s in workload.sessions(5, random.Random(2))] != [s.key for s in a]


async def test_bfcl_steps_expect_calls_and_answers_in_words_do_not() -> None:
    """Each ground-truth call is one step marked expects_call; each turn ends with a free
    answer. A step answered in words runs the ground truth, so every session plays alike."""
    workload = BfclWorkload(max_turns=2)
    (session,) = workload.sessions(1, random.Random(4))
    truth = session.scenario.ground_truth[:2]
    marks: list[bool] = []

    async def call(
        messages: list[dict[str, object]], tools: object, expects_call: bool = False
    ) -> Reply:
        assert tools == session.tools
        marks.append(expects_call)
        return Reply("I cannot call tools.")

    outcome = await session.play(call)
    assert marks == [m for turn in truth for m in [True] * len(turn) + [False]]
    assert len(outcome.checks) == sum(len(turn) for turn in truth)
    assert not any(c.valid for c in outcome.checks)


def test_mtbench_questions_load() -> None:
    questions = load_questions()
    assert len(questions) == 80
    categories = {q.category for q in questions}
    assert len(categories) == 8
    assert all(sum(q.category == c for q in questions) == 10 for c in categories)
    assert all(len(q.turns) == 2 and all(q.turns) for q in questions)


def test_mtbench_sessions_are_seeded_and_repeat_past_80() -> None:
    sessions = MtBenchWorkload().sessions(90, random.Random(3))
    assert len(sessions) == 90
    assert sessions[80].key == sessions[0].key
    again = MtBenchWorkload().sessions(3, random.Random(3))
    assert [s.key for s in again] == [s.key for s in sessions[:3]]


async def test_synthetic_sessions_send_the_same_growing_prompts_for_a_seed() -> None:
    agent = SyntheticAgent(steps=3, steps_per_turn=2, tool_latency_s=0, think_time_s=0)
    (session,) = SyntheticWorkload(agent).sessions(1, random.Random(5))
    seen: list[list[list[dict[str, object]]]] = [[], []]
    for run in seen:

        async def call(
            messages: list[dict[str, object]],
            tools: object,
            expects_call: bool = False,
            run: list[list[dict[str, object]]] = run,
        ) -> Reply:
            run.append([dict(m) for m in messages])
            return Reply("ok")

        await session.play(call)
    assert seen[0] == seen[1]
    assert [len(m) for m in seen[0]] == [1, 3, 5]  # each step adds an answer and an observation
    assert len(json.dumps(seen[0][2])) > len(json.dumps(seen[0][1]))


def test_interleave_mixes_workloads_round_robin() -> None:
    sessions = interleave([MtBenchWorkload(), SyntheticWorkload()], 5, seed=0)
    assert [s.workload for s in sessions] == [
        "mtbench",
        "synthetic",
        "mtbench",
        "synthetic",
        "mtbench",
    ]
