"""Streamed chat chunks: the plain-text fast path writes the bytes the full models write.

Content chunks skip the pydantic models (only the delta is encoded, inside a frame
rendered once per stream by the full path); these tests hold that to byte equality
with the full rendering, for text JSON must escape and for both usage settings.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from edge.answers import AnswerContext, _ChatChunks, chat_chunks
from edge.generation import FinishEvent, GenerationStats, TokenEvent
from edge.metrics import EdgeMetrics
from edge.openai_protocol import ChatDelta

pytestmark = pytest.mark.timeout(10)

TEXTS = ["Hello", ' "quoted" \\ back', "line\nbreak\ttab\r", "naïve ☃ 🙂", "\x00\x1f\u2028", ""]


def _ctx(include_usage: bool, model: str = "org/model") -> AnswerContext:
    return AnswerContext(
        model=model, node_id="e1", metrics=EdgeMetrics(), endpoint="chat", index=0,
        include_usage=include_usage,
    )  # fmt: skip


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_content_chunk_is_byte_for_byte_the_full_rendering(include_usage: bool) -> None:
    # A model name that looks like the frame's own marker must not confuse the frame.
    ctx = _ctx(include_usage, model='m {"content":"tandem-delta-mark-7f3c"}')
    chunks = _ChatChunks(ctx)
    for text in TEXTS:
        fast = chunks.content(text or None, [])
        assert fast == _ChatChunks(ctx).chunk(ChatDelta(content=text or None))
        body = json.loads(fast[len(b"data: ") :])
        assert body["choices"][0]["delta"] == ({"content": text} if text else {})
        assert ("usage" in body) is include_usage


async def test_a_streamed_answer_reads_as_before() -> None:
    async def events() -> AsyncIterator[TokenEvent | FinishEvent]:
        for i, text in enumerate(TEXTS):
            yield TokenEvent([i], text)
        yield FinishEvent(text="", stats=GenerationStats(completion_tokens=len(TEXTS)))

    ctx = _ctx(include_usage=False)
    out = [json.loads(c[len(b"data: ") :]) async for c in chat_chunks(events(), ctx)]

    deltas = [body["choices"][0]["delta"] for body in out]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "".join(TEXTS)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert {body["id"] for body in out} == {ctx.id}
