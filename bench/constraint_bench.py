"""The cost of constrained decoding: tokens/s with and without a constraint, edge and cloud.

Same prompt, greedy, 64 tokens: free decoding, a JSON schema, any JSON object and
an enforced tool call (``tool_choice: required``), on one llama.cpp slot (edge) and
on vLLM's engine (cloud, ``--cloud``), both in this process. The first answer of
each mode is dropped (it compiles the grammar and fills the prefix cache); the
table gives the median decode rate after the first token, the spread over
``--repeats``, the slowdown against free decoding in the same run (target: under
10%), and the load average.

    python -m bench.constraint_bench --repeats 5 --cloud
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from edge.engine import LlamaEngine
from edge.generation import GenerationRequest, TokenEvent
from edge.openai_protocol import ChatCompletionRequest
from edge.prompts import PromptBuilder
from edge.settings import EdgeSettings
from edge.state import engine_config
from models.catalog import DEFAULT_PAIR

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "bio"],
}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
MODES: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {"response_format": SCHEMA},
    "json_object": {"response_format": {"type": "json_object"}},
    "tool_call": {"tools": [WEATHER], "tool_choice": "required"},
}
MESSAGES = [{"role": "user", "content": "Describe a person with a long biography."}]


def _body(extra: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": DEFAULT_PAIR, "messages": MESSAGES, "temperature": 0, "max_tokens": 64, **extra}
    )


async def decode_rate(engine: LlamaEngine, prompts: PromptBuilder, extra: dict[str, Any]) -> float:
    """Tokens/s after the first token of one greedy 64-token answer on the edge."""
    body = _body(extra)
    request = GenerationRequest(
        prompts.chat_tokens(body), body.to_sampling_params(default_max_tokens=64)
    )
    tokens, first = 0, None
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            if first is None:
                first = time.perf_counter()
            else:
                tokens += 1
    assert first is not None
    return tokens / (time.perf_counter() - first)


async def cloud_decode_rate(engine: Any, extra: dict[str, Any]) -> float:
    """Tokens/s after the first token of one greedy 64-token answer on vLLM."""
    from mesh.protocol import SamplingParams as WireSampling

    body = _body(extra)
    messages = [m.to_template_dict() for m in body.messages]
    sampling = WireSampling(max_tokens=64, temperature=0, constraint=body.output_constraint)
    ids = engine.render(messages, body.active_tools())
    tokens, first = 0, None
    async for delta in engine.generate(uuid.uuid4().hex, ids, sampling, []):
        if first is None and delta.token_ids:
            first = time.perf_counter()
            tokens -= len(delta.token_ids)
        tokens += len(delta.token_ids)
    assert first is not None
    return tokens / (time.perf_counter() - first)


async def _table(label: str, rate: Any, repeats: int) -> None:
    medians: dict[str, float] = {}
    for mode, extra in MODES.items():
        rates = [await rate(extra) for _ in range(repeats + 1)][1:]
        medians[mode] = statistics.median(rates)
        print(
            f"{label:<6} {mode:<12} decode tok/s {medians[mode]:6.1f} "
            f"(spread {min(rates):.1f}-{max(rates):.1f}), "
            f"{medians[mode] / medians['free'] - 1:+.0%} vs free (target > -10%)"
        )


async def run(repeats: int, cloud: bool) -> None:
    """Measure every mode and print the table."""
    print(f"load average before {os.getloadavg()}")
    config, template = engine_config(EdgeSettings())
    engine = LlamaEngine(config)
    prompts = PromptBuilder(template, engine.tokenize, config.n_ctx, engine.n_vocab)
    try:
        await _table("edge", lambda extra: decode_rate(engine, prompts, extra), repeats)
    finally:
        await engine.close()
    if cloud:
        from cloud.engine import VllmEngine
        from cloud.settings import CloudSettings

        vllm = VllmEngine(CloudSettings(kv_cache_gb=1))
        await vllm.start()
        try:
            await _table("cloud", lambda extra: cloud_decode_rate(vllm, extra), repeats)
        finally:
            vllm.shutdown()
    print(f"load average after {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cloud", action="store_true", help="measure vLLM too")
    args = parser.parse_args()
    asyncio.run(run(args.repeats, args.cloud))


if __name__ == "__main__":
    main()
