"""The cost of constrained decoding on the edge: llama.cpp tokens/s with and without a grammar.

Same prompt, greedy, 64 tokens, on one llama.cpp slot in this process: free
decoding, a JSON schema and any JSON object. The first answer of each mode is
dropped (it parses the grammar and fills the prefix cache); the table gives the
median decode rate after the first token, the spread over ``--repeats``, the
slowdown against free decoding in the same run (target: under 10%), and the
load average.

    python -m bench.constraint_bench --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
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
MODES: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {"response_format": SCHEMA},
    "json_object": {"response_format": {"type": "json_object"}},
}
MESSAGES = [{"role": "user", "content": "Describe a person with a long biography."}]


async def decode_rate(engine: LlamaEngine, prompts: PromptBuilder, extra: dict[str, Any]) -> float:
    """Tokens/s after the first token of one greedy 64-token answer."""
    body = ChatCompletionRequest.model_validate(
        {"model": DEFAULT_PAIR, "messages": MESSAGES, "temperature": 0, "max_tokens": 64, **extra}
    )
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


async def run(repeats: int) -> None:
    """Measure every mode and print the table."""
    config, template = engine_config(EdgeSettings())
    engine = LlamaEngine(config)
    prompts = PromptBuilder(template, engine.tokenize, config.n_ctx, engine.n_vocab)
    print(f"load average before {os.getloadavg()}")
    medians: dict[str, float] = {}
    try:
        for mode, extra in MODES.items():
            rates = [await decode_rate(engine, prompts, extra) for _ in range(repeats + 1)][1:]
            medians[mode] = statistics.median(rates)
            print(
                f"{mode:<12} decode tok/s {medians[mode]:6.1f} "
                f"(spread {min(rates):.1f}-{max(rates):.1f}), "
                f"{medians[mode] / medians['free'] - 1:+.0%} vs free (target > -10%)"
            )
    finally:
        await engine.close()
    print(f"load average after {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(run(parser.parse_args().repeats))


if __name__ == "__main__":
    main()
