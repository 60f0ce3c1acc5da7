"""A worker reuses the edge's prompt ids only when they check out (cloud.prompt_reuse).

The edge's side is the edge's own ``PromptBuilder``; the worker's is the simulated
engine's rendering and tokenizing, which is the real template and the pair's real
llama.cpp vocabulary (no weights). The real vLLM worker's side is checked end to end
in tests/cloud/test_cloud_route.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from cloud.prompt_reuse import PromptReuse
from cloud.settings import CloudSettings
from cloud.sim_engine import SimVllmEngine
from edge.openai_protocol import ChatCompletionRequest
from edge.prompts import PromptBuilder
from mesh.errors import ProtocolError
from mesh.protocol import GenerateRequest, RenderedPrompt
from models.catalog import DEFAULT_PAIR

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]
CHAT: dict[str, Any] = {
    "model": DEFAULT_PAIR,
    "messages": [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Open the config and tell me the port. Ünïcode too."},
    ],
    "tools": TOOLS,
}


@pytest.fixture
async def engine() -> AsyncIterator[SimVllmEngine]:
    engine = SimVllmEngine(CloudSettings.model_validate({"engine": "sim", "kv_cache_gb": 1}))
    await engine.start()
    yield engine
    engine.shutdown()


class _CountingTokenizer:
    def __init__(self, engine: SimVllmEngine) -> None:
        self._engine = engine
        self.calls = 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return self._engine.tokenize(text)


def _edge_prompt(engine: SimVllmEngine, chat: dict[str, Any]) -> RenderedPrompt:
    """What the edge sends: its PromptBuilder's rendering of the OpenAI request."""
    builder = PromptBuilder(engine.template, engine.tokenize, 8192, engine.vocab_size)
    return builder.chat_prompt(ChatCompletionRequest.model_validate(chat))


def _worker_text(engine: SimVllmEngine, chat: dict[str, Any]) -> str:
    """What the worker renders: the messages and tools as the edge's cloud route sends them."""
    body = ChatCompletionRequest.model_validate(chat)
    messages = [m.to_template_dict() for m in body.messages]
    return engine.render_text(messages, body.active_tools())


def test_the_edges_ids_are_reused_once_verified_and_sampled_after(
    engine: SimVllmEngine,
) -> None:
    tokenize = _CountingTokenizer(engine)
    reuse = PromptReuse(tokenize, lambda: engine.vocab_size, verify_requests=2, sample_every=4)
    sent = _edge_prompt(engine, CHAT)
    text = _worker_text(engine, CHAT)
    assert sent.text_sha256 == RenderedPrompt.digest(text)  # same template, same messages
    for _ in range(8):
        assert reuse.token_ids(text, sent) == engine.tokenize(text)
    # Requests 1 and 2 verified, then one in four (the 4th and 8th): 4 tokenizer calls
    # for 8 requests, every one served with the edge's ids.
    assert tokenize.calls == 4
    assert (reuse.reused, reuse.tokenized, reuse.refused, reuse.enabled) == (8, 0, 0, True)


def test_another_rendering_is_tokenized_by_the_worker(engine: SimVllmEngine) -> None:
    tokenize = _CountingTokenizer(engine)
    reuse = PromptReuse(tokenize, lambda: engine.vocab_size, verify_requests=0)
    sent = _edge_prompt(engine, CHAT)
    other = {**CHAT, "messages": [*CHAT["messages"], {"role": "user", "content": "And?"}]}
    text = _worker_text(engine, other)
    assert reuse.token_ids(text, sent) == engine.tokenize(text) != sent.token_ids
    assert (reuse.reused, reuse.tokenized, reuse.refused) == (0, 0, 1)
    assert reuse.enabled  # a different conversation is not a tokenizer mismatch
    # No ids sent (an older edge, or a completion): tokenized, not refused.
    assert reuse.token_ids(text, None) == engine.tokenize(text)
    assert (reuse.tokenized, reuse.refused) == (1, 1)


def test_ids_outside_the_vocabulary_are_refused(engine: SimVllmEngine) -> None:
    reuse = PromptReuse(engine.tokenize, lambda: engine.vocab_size, verify_requests=0)
    text = _worker_text(engine, CHAT)
    for bad in ([engine.vocab_size], [-1]):
        sent = RenderedPrompt(token_ids=[1, *bad], text_sha256=RenderedPrompt.digest(text))
        assert reuse.token_ids(text, sent) == engine.tokenize(text)
    assert (reuse.reused, reuse.refused, reuse.enabled) == (0, 2, True)


def test_ids_that_differ_from_the_workers_turn_reuse_off_for_good(
    engine: SimVllmEngine, caplog: pytest.LogCaptureFixture
) -> None:
    tokenize = _CountingTokenizer(engine)
    reuse = PromptReuse(tokenize, lambda: engine.vocab_size, verify_requests=1)
    text = _worker_text(engine, CHAT)
    own = engine.tokenize(text)
    # The right text, ids from some other tokenizer: the verification catches it.
    wrong = RenderedPrompt(
        token_ids=[*own[:-1], own[-1] + 1], text_sha256=RenderedPrompt.digest(text)
    )
    assert reuse.token_ids(text, wrong) == own
    assert not reuse.enabled and reuse.refused == 1
    assert "do not share a tokenizer" in caplog.text
    # From then on the worker tokenizes, even ids that would have been right.
    assert reuse.token_ids(text, _edge_prompt(engine, CHAT)) == own
    assert (reuse.reused, reuse.tokenized, tokenize.calls) == (0, 1, 2)


def test_the_prompt_is_on_the_wire_only_when_sent_and_is_checked() -> None:
    base = GenerateRequest(
        request_id="r1", model=DEFAULT_PAIR, messages=[{"role": "user", "content": "hi"}],
        reply_subject="_INBOX.x",
    )  # fmt: skip
    assert b'"prompt"' not in base.to_bytes()
    sent = base.model_copy(update={"prompt": RenderedPrompt.of("hi", [1, 2])})
    back = GenerateRequest.from_bytes(sent.to_bytes())
    assert back.prompt == RenderedPrompt(token_ids=[1, 2], text_sha256=RenderedPrompt.digest("hi"))
    bad = sent.to_bytes().replace(back.prompt.text_sha256.encode(), b"not-a-digest")
    with pytest.raises(ProtocolError, match="text_sha256"):
        GenerateRequest.from_bytes(bad)
