"""Real agent frameworks against the edge daemon, each with its own request shapes.

Each library drives the edge the way it drives OpenAI: the Agents SDK's function-tool
loop (``tool_choice: "required"``) over chat completions and over the Responses API (its
default model), instructor's named tool choice and ``json_schema`` response format,
LangChain's ``with_structured_output`` (json_schema) and pydantic-ai's output tool (a
required tool call). The 135M model calls no tool and writes no JSON when decoding is
free, so each test fails if the edge ignored the field the library relies on.
Assertions are on validity and shape, never on wording.
"""

from __future__ import annotations

import json

import instructor
import pytest
from agents import (
    Agent,
    MessageOutputItem,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

pytestmark = pytest.mark.timeout(60)

EDGE = {"x-tandem-route": "edge"}
PROMPT = "Alice is 31 years old."


class Person(BaseModel):
    """What the structured-output libraries extract."""

    name: str
    age: int


def _assert_person(person: object) -> None:
    assert isinstance(person, Person)  # the library validated it against the model
    assert person.name and person.age >= 0


@pytest.fixture(scope="module", autouse=True)
def _no_tracing_export() -> None:
    set_tracing_disabled(True)  # the SDK would otherwise post traces to api.openai.com


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_agents_sdk_tool_loop_runs_the_tool_then_answers(
    edge: EdgeProcess, api: str, stream: bool
) -> None:
    """The SDK's default model speaks the Responses API (``OpenAIResponsesModel``: no
    ``previous_response_id``, it resends the conversation, its function_call items with
    their ``id`` and ``status``, ``include: []`` and strict tools each turn);
    ``OpenAIChatCompletionsModel`` speaks chat."""
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"Sunny, 21 C in {city}."

    async with edge.async_client(default_headers=EDGE) as client:
        model = (
            OpenAIResponsesModel(model=DEFAULT_PAIR, openai_client=client)
            if api == "responses"
            else OpenAIChatCompletionsModel(model=DEFAULT_PAIR, openai_client=client)
        )
        agent = Agent(
            name="weather",
            instructions="Answer with the weather tool.",
            tools=[get_weather],
            model=model,
            # The SDK drops tool_choice after the first tool call, so turn two answers text.
            model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
        )
        question = "What is the weather in Paris?"
        if stream:
            streamed = Runner.run_streamed(agent, question, max_turns=4)
            async for _ in streamed.stream_events():
                pass
            items, final = streamed.new_items, streamed.final_output
        else:
            result = await Runner.run(agent, question, max_turns=4)
            items, final = result.new_items, result.final_output

    assert len(cities) == 1 and isinstance(cities[0], str) and cities[0]
    assert [type(item) for item in items] == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    call = items[0].raw_item
    assert getattr(call, "name", None) == "get_weather"
    assert json.loads(getattr(call, "arguments", "")) == {"city": cities[0]}
    assert isinstance(final, str) and final.strip()


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_extracts_a_valid_model_without_retries(
    edge: EdgeProcess, mode: instructor.Mode
) -> None:
    client = instructor.from_openai(edge.client(default_headers=EDGE), mode=mode)
    person, completion = client.chat.completions.create_with_completion(
        model=DEFAULT_PAIR,
        response_model=Person,
        max_retries=0,  # a first answer that fails validation raises
        temperature=0,
        max_tokens=64,
        messages=[{"role": "user", "content": PROMPT}],
    )
    _assert_person(person)
    message = completion.choices[0].message
    if mode is instructor.Mode.TOOLS:  # named tool choice: the answer is that one call
        assert [call.function.name for call in message.tool_calls or []] == ["Person"]
    else:
        assert message.tool_calls is None and json.loads(message.content or "")


def test_langchain_structured_output_parses_the_json_schema_answer(edge: EdgeProcess) -> None:
    llm = ChatOpenAI(
        model=DEFAULT_PAIR,
        base_url=f"{edge.base_url}/v1",
        api_key=SecretStr("unused"),
        default_headers=EDGE,
        temperature=0,
        max_completion_tokens=64,  # the field's alias, sent as such
        max_retries=0,
    )
    answer = llm.with_structured_output(Person, include_raw=True).invoke(PROMPT)
    assert answer["parsing_error"] is None
    _assert_person(answer["parsed"])


@pytest.mark.parametrize("stream", [False, True])
async def test_pydantic_ai_output_tool_yields_a_valid_model(
    edge: EdgeProcess, stream: bool
) -> None:
    async with edge.async_client(default_headers=EDGE) as client:
        model = OpenAIChatModel(DEFAULT_PAIR, provider=OpenAIProvider(openai_client=client))
        agent = PydanticAgent(
            model,
            output_type=Person,
            retries=0,
            model_settings={"temperature": 0, "max_tokens": 64},
        )
        if stream:
            async with agent.run_stream(PROMPT) as streamed:
                person = await streamed.get_output()
            messages = streamed.all_messages()
        else:
            result = await agent.run(PROMPT)
            person, messages = result.output, result.all_messages()
    _assert_person(person)
    calls = [part for m in messages for part in m.parts if isinstance(part, ToolCallPart)]
    assert [call.tool_name for call in calls] == ["final_result"]
