"""What the runner sends: tool_choice only on an enforced pass's steps that expect a call.

The edge here is a fake at the HTTP libraries' public seam, ``MockTransport`` (of
``httpx2``, the httpx the openai client is built on, for chat completions; of httpx
for ``/metrics``). It records each request body and streams back one fixed answer,
as the edge's SSE would: the runner's own code all runs.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import httpx2
import openai
import pytest

from tandem.bench.bfcl import BfclWorkload
from tandem.bench.metrics import SessionRecord
from tandem.bench.mtbench import MtBenchWorkload
from tandem.bench.runner import (
    ENFORCED_TOOL_CHOICE,
    MODES,
    Caller,
    EngineMeter,
    NoProgress,
    RunPlan,
    Target,
    _ModeRun,
)

TOOLS = [{"type": "function", "function": {"name": "cd", "parameters": {"type": "object"}}}]


def _sse(*chunks: dict[str, Any]) -> bytes:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def _answer(request: httpx2.Request) -> httpx2.Response:
    """A streamed answer: one text chunk, finish 'length', then the usage chunk."""
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    delta = {"index": 0, "delta": {"content": "<tool_call>"}, "finish_reason": None}
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    body = _sse(
        {**head, "choices": [delta]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {**head, "choices": [], "usage": {**usage, "tandem": {"route": "edge"}}},
    )
    return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tool_choice", [None, ENFORCED_TOOL_CHOICE])
async def test_tool_choice_goes_only_on_enforced_steps(tool_choice: str | None) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return _answer(request)

    http = openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(handler))
    async with openai.AsyncOpenAI(
        base_url="http://edge.test/v1", api_key="k", max_retries=0, http_client=http
    ) as client:
        target = Target(base_url="http://edge.test", model="m")
        caller = Caller(client, target, MODES["edge"], "t", tool_choice)
        record = SessionRecord("bfcl:1", "bfcl", 0.0)
        messages = [{"role": "user", "content": "go to docs"}]
        await caller.call(record, "s", messages, TOOLS, expects_call=True)
        await caller.call(record, "s", messages, TOOLS)  # the answer in words
    assert [body.get("tool_choice") for body in sent] == [tool_choice, None]
    assert all(body["tools"] == TOOLS for body in sent)
    assert [c.tool_choice for c in record.calls] == [tool_choice, None]
    assert [c.finish_reason for c in record.calls] == ["length", "length"]
    assert caller.expecting_calls == {"bfcl:1"}
    # Only the window's off-cloud answers are replayed on the cloud, never the pass's.
    assert len(caller.off_cloud) == (2 if tool_choice is None else 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("enforce", [True, False])
async def test_a_mode_plays_its_bfcl_sessions_again_enforcing(enforce: bool) -> None:
    """Window first (free), then, when enforcing, the BFCL sessions only, each step that
    expects a call sent with tool_choice 'required' and the answers in words free."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return _answer(request)

    bfcl = BfclWorkload(max_turns=1).sessions(1, random.Random(0))
    chat = MtBenchWorkload().sessions(1, random.Random(0))
    steps = len(bfcl[0].scenario.ground_truth[0])
    plan = RunPlan(modes=["edge"], concurrency=[1], enforce_tool_choice=enforce)
    target = Target(base_url="http://edge.test", model="m")
    http = openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(handler))
    async with (
        openai.AsyncOpenAI(
            base_url="http://edge.test/v1", api_key="k", max_retries=0, http_client=http
        ) as client,
        httpx.AsyncClient(transport=httpx.MockTransport(_metrics)) as metrics,
    ):
        run = _ModeRun(client, target, MODES["edge"], 1, plan, NoProgress())
        played = await run.play([*chat, *bfcl], EngineMeter(target, metrics))
    window = 2 + steps + 1  # two MT-Bench turns; the BFCL turn's steps and its answer
    replayed = window  # every call was served off the cloud: each is replayed there
    enforced_calls = sent[window + replayed :]
    assert len(played.records) == 2
    assert all("tool_choice" not in body for body in sent[: window + replayed])
    if not enforce:
        assert played.enforced is None and not enforced_calls
        return
    assert played.enforced is not None
    assert [r.key for r in played.enforced] == [bfcl[0].key]  # BFCL only
    choices = [body.get("tool_choice") for body in enforced_calls]
    assert choices == [ENFORCED_TOOL_CHOICE] * steps + [None]
    # The window's tag and session ids: the pass reuses the prefix the window evaluated.
    assert enforced_calls[0]["messages"] == sent[window - steps - 1]["messages"]


def _metrics(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="tandem_edge_engine_busy_seconds_total 1.0\n")
