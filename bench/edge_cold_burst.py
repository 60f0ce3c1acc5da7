"""A burst of sessions sharing a system prompt, sent at once to an empty batched engine.

In-process (no HTTP), pinned to ``--core``: ``--sessions`` chats of ``edge_bench``
(their 24-token system header shared) reach a fresh ``BatchedEngine`` together. Prints
each request's time to first token and the first decode steps (sequence id and tokens
evaluated), so it shows whether the shared prefix was evaluated once.

    python -m bench.edge_cold_burst --sessions 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench.edge_bench import prompts as chats
from edge.batch_scheduler import BatchScheduler
from edge.batched_engine import BatchedEngine
from edge.generation import EngineConfig, GenerationRequest
from edge.sampling import SamplingParams
from models.bundled import locate_bundled_gguf
from models.chat_template import load_template, render_chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4, help="decode steps to print")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    steps: list[tuple[float, list[tuple[int, int]]]] = []
    plan = BatchScheduler._plan

    def traced(self: BatchScheduler) -> Any:  # records each step's work, then does it
        work = plan(self)
        steps.append((time.perf_counter(), [(j.seq.seq_id, n) for j, n in work if j.seq]))
        return work

    BatchScheduler._plan = traced  # type: ignore[method-assign]
    config = EngineConfig(
        model_path=locate_bundled_gguf(), batched=True, sequences=args.sessions, max_queue=64
    )
    engine = BatchedEngine(config)
    template = load_template("chatml_tools")
    prompts = [engine.tokenize(render_chat(template, c)) for c in chats(args.sessions)]

    async def first_token(prompt: list[int], t0: float) -> float:
        first = 0.0
        async for _ in engine.generate(
            GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0.0))
        ):
            first = first or time.perf_counter() - t0
        return first

    async def run() -> None:
        await first_token(engine.tokenize("Hello there"), time.perf_counter())  # warm, no share
        steps.clear()
        t0 = time.perf_counter()
        ttfts = await asyncio.gather(*(first_token(p, t0) for p in prompts))
        print(f"prompt tokens: {[len(p) for p in prompts]}")
        print(f"TTFT ms: {[round(1e3 * t) for t in ttfts]}")
        for at, work in steps[: args.steps]:
            print(f"step at {1e3 * (at - t0):6.0f} ms: (sequence, tokens) {work}")
        print(f"load average {os.getloadavg()[0]:.2f}")
        await engine.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
