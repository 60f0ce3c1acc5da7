"""The edge's OpenAI API, driven by the official ``openai`` client against a real daemon."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from models.bundled import locate_bundled_gguf
from models.chat_template import load_template, render_chat
from tandem.local import EdgeProcess

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def vocab():  # type: ignore[no-untyped-def]
    """A vocab-only llama.cpp model to count tokens independently of the server."""
    from llama_cpp import Llama

    return Llama(str(locate_bundled_gguf()), vocab_only=True, verbose=False)


def _prompt_len(vocab, messages, tools=None) -> int:  # type: ignore[no-untyped-def]
    text = render_chat(load_template("chatml_tools"), messages, tools=tools)
    return len(vocab.tokenize(text.encode(), add_bos=False, special=True))


def test_chat_non_streaming_usage_matches_the_tokenizer(edge: EdgeProcess, vocab) -> None:  # type: ignore[no-untyped-def]
    client = edge.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0
    )
    answer = raw.parse()
    assert raw.headers["x-tandem-route"] == "edge"
    assert raw.headers["x-tandem-rule"] == "default"
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in {"stop", "length"}
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens == _prompt_len(vocab, HELLO)
    if answer.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = usage.model_extra or {}
    assert extra["tandem"]["route"] == "edge"


def test_streaming_matches_non_streaming_and_reports_usage(edge: EdgeProcess) -> None:
    client = edge.client()
    whole = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=20, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_and_seeded_sampling(edge: EdgeProcess) -> None:
    client = edge.client()
    free = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    text = free.choices[0].message.content or ""
    assert len(text) > 4
    stop = text[2:4]
    stopped = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=20, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    a, b = (
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b


def test_text_completions_endpoint(edge: EdgeProcess) -> None:
    client = edge.client()
    answer = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert answer.object == "text_completion"
    assert answer.choices[0].text
    assert answer.usage is not None and answer.usage.completion_tokens <= 5
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == answer.choices[0].text


def test_models_and_health(edge: EdgeProcess) -> None:
    models = edge.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(f"{edge.base_url}/health").json()
    assert health["status"] == "ok"
    assert health["model"] == MODEL


# Greedy answers are exact only between like evaluations: llama.cpp's logits for a
# prompt depend on how it was batched (a prefix restored from the cache and one token
# evaluated differs from one batch by up to ~0.5 in the logits), so at a near-tie the
# same request can answer differently after the cache changed. This edge saves no
# conversations, and each prompt starts with its own system message: every request
# below keeps the same 3 cached tokens (``<|im_start|>system\n``) and evaluates the
# rest in one batch, concurrent or alone, so its answer must be identical. That holds
# on the slot engine, where each request is evaluated alone; the batched engine's
# concurrent streams (one decode step, many sequences) are checked against their
# answers alone up to near-ties in tests/edge/test_batched_engine.py.
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi")


@pytest.fixture(scope="module")
def uncached_edge() -> Iterator[EdgeProcess]:
    with EdgeProcess(batching="slots", slots=1, max_queue=64, session_cache_mb=0) as proc:
        yield proc


async def test_eight_concurrent_streams_all_complete_uninterrupted(
    uncached_edge: EdgeProcess,
) -> None:
    async with uncached_edge.async_client() as client:
        await _eight_streams(client)


def _count_prompt(name: str, i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"{name} is a terse assistant."},
        {"role": "user", "content": f"Count from {i} to {i + 5}."},
    ]


async def _eight_streams(client: openai.AsyncOpenAI) -> None:
    prompts = [_count_prompt(name, i) for i, name in enumerate(_NAMES)]

    async def stream(messages) -> tuple[str, str | None]:  # type: ignore[no-untyped-def]
        parts, finish = [], None
        async for chunk in await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
        ):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def other_prompt() -> None:
        await client.chat.completions.create(
            model=MODEL, messages=_count_prompt("Zed", 9), max_tokens=1, temperature=0
        )

    await other_prompt()  # the slot holds a conversation: every prompt below keeps 3 tokens
    results = await asyncio.gather(*(stream(p) for p in prompts))
    await other_prompt()  # the slot may hold the last concurrent prompt whole
    # Each concurrent answer equals the same request served alone: nothing interrupted
    # or interleaved another request's tokens.
    for messages, (text, finish) in zip(prompts, results, strict=True):
        assert finish in {"stop", "length"}
        alone = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0
        )
        assert alone.usage is not None and alone.usage.prompt_tokens_details is not None
        assert alone.usage.prompt_tokens_details.cached_tokens == 3  # like the streams
        assert text == alone.choices[0].message.content


_PIECE_COUNTERS = (
    "tandem_edge_prompt_pieces_cached_total",
    "tandem_edge_prompt_pieces_tokenized_total",
)


def _prompt_evals(edge: EdgeProcess) -> float:
    return edge.metrics()["tandem_edge_llama_prompt_eval_tokens_total"]


def test_second_turn_evaluates_only_new_tokens(edge: EdgeProcess, vocab) -> None:  # type: ignore[no-untyped-def]
    client = edge.client()
    session = {"x-session-id": f"s-{uuid.uuid4().hex}"}
    turn1 = [
        {"role": "system", "content": "You are terse. " * 20},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=turn1, max_tokens=8, temperature=0, extra_headers=session
    )
    # Another conversation in between evicts turn 1 from the slot's KV cache.
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Unrelated."}],
        max_tokens=4,
        temperature=0,
    )
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another one."},
    ]
    before = _prompt_evals(edge)
    pieces_before = edge.metrics()
    second = client.chat.completions.create(
        model=MODEL, messages=turn2, max_tokens=1, temperature=0, extra_headers=session
    )
    evaluated = _prompt_evals(edge) - before  # llama.cpp's own n_p_eval counter
    pieces = {k: edge.metrics()[k] - pieces_before[k] for k in _PIECE_COUNTERS}
    # Turn 1's system and user messages were tokenized before; only the new ones are.
    assert pieces["tandem_edge_prompt_pieces_cached_total"] >= 2
    assert pieces["tandem_edge_prompt_pieces_tokenized_total"] == 2  # assistant + user
    prompt_len = _prompt_len(vocab, turn2)
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert second.usage.prompt_tokens == prompt_len  # type: ignore[union-attr]
    assert cached >= _prompt_len(vocab, turn1) - 2
    assert evaluated == prompt_len - cached
    assert evaluated < prompt_len / 3


def test_same_conversation_without_session_header_hits_by_prefix(edge: EdgeProcess) -> None:
    client = edge.client()
    turn1 = [{"role": "user", "content": "Describe a forest in detail. " * 8}]
    client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=4, temperature=0)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Other."}], max_tokens=2, temperature=0
    )
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "Trees."},
        {"role": "user", "content": "More"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=turn2, max_tokens=1, temperature=0
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 40  # type: ignore[union-attr]


def test_tools_are_accepted_and_answer_is_well_formed(edge: EdgeProcess) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    client = edge.client()
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=48, temperature=0
    )
    choice = answer.choices[0]
    # A 135M model may or may not call the tool; either way the answer is well formed.
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            json.loads(call.function.arguments)
    else:
        assert choice.message.content
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, max_tokens=48, temperature=0, stream=True
        )
    )
    finals = [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]


def test_tool_round_trip_conversation_renders(edge: EdgeProcess) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    answer = edge.client().chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=16, temperature=0
    )
    assert answer.usage.prompt_tokens > 20  # type: ignore[union-attr]


def test_client_disconnect_cancels_generation(edge: EdgeProcess) -> None:
    before = edge.metrics()
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "stop": ["@@@never@@@"],
    }
    with httpx.stream("POST", f"{edge.base_url}/v1/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and '"content":"' in line.replace(" ", ""):
                break  # leave after the first token
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = edge.metrics()
        # The cancel is counted in the slot's thread; the slot is freed a moment later.
        cancelled = after["tandem_edge_cancelled_generations_total"] > before.get(
            "tandem_edge_cancelled_generations_total", 0
        )
        if cancelled and after["tandem_edge_running_requests"] == 0:
            break
        time.sleep(0.05)
    assert after["tandem_edge_cancelled_generations_total"] == (
        before["tandem_edge_cancelled_generations_total"] + 1
    )
    assert after["tandem_edge_running_requests"] == 0
    generated = (
        after["tandem_edge_engine_generated_tokens_total"]
        - before["tandem_edge_engine_generated_tokens_total"]
    )
    assert generated < 200  # stopped near the disconnect, not after 1500 tokens
    # The daemon goes on serving.
    answer = edge.client().chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, temperature=0
    )
    assert answer.choices[0].message.content is not None


def test_client_leaving_a_non_streaming_request_cancels_it(edge: EdgeProcess) -> None:
    before = edge.metrics()["tandem_edge_cancelled_generations_total"]
    count = [{"role": "user", "content": "List the numbers from 1 to 1000, separated by commas."}]
    # About 20 s of generation (it runs to max_tokens); the client leaves after 1 s.
    body = {"model": MODEL, "messages": count, "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{edge.base_url}/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 10
    while edge.metrics()["tandem_edge_cancelled_generations_total"] == before:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.05)
    assert edge.metrics()["tandem_edge_running_requests"] == 0
