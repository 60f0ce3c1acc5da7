"""Speculative route versus cloud-only, at emulated edge-cloud round-trip times, same run.

The edge (llama.cpp, core 0) and one vLLM worker (core 1) run as real processes
on one NATS; the edge adds an emulated WAN round trip to every cloud request
(``TANDEM_EDGE_EMULATED_RTT_MS``). For each RTT and concurrency, the same greedy
requests go through the cloud-only route and the speculative route.

Reported per mode: end-to-end output tokens/s, acceptance rate, tokens per
verification, and cloud forward passes per output token. The last is a proxy
for cloud engine-seconds per token: cloud-only runs one decode step per output
token; speculative runs one verification pass per round (each pass scores
several positions, so it costs somewhat more than one decode step).

    python bench/speculative_bench.py --requests 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.server import EmbeddedNats
from tests.edge_process import EdgeProcess
from tests.worker_process import WorkerProcess

MODEL = "smollm2-135m"
TOPICS = ["the sea", "trains", "coffee", "winter", "bees", "a library", "bread", "the moon"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Distinct greedy requests."""
    return [[{"role": "user", "content": f"Write about {TOPICS[i % 8]} ({i})."}] for i in range(n)]


async def run(
    edge: EdgeProcess,
    route: str,
    chats: list[list[dict[str, str]]],
    max_tokens: int,
    concurrency: int,
) -> dict[str, float]:
    """Send every chat on ``route``; totals of tokens, verification stats and wall time."""
    gate = asyncio.Semaphore(concurrency)
    totals = {"tokens": 0.0, "drafted": 0.0, "accepted": 0.0, "rounds": 0.0}
    async with edge.async_client(timeout=600) as client:

        async def one(chat: list[dict[str, str]]) -> None:
            async with gate:
                answer = await client.chat.completions.create(
                    model=MODEL,
                    messages=chat,
                    max_tokens=max_tokens,
                    temperature=0,  # type: ignore[arg-type]
                    extra_headers={"x-tandem-route": route},
                )
                assert answer.usage is not None
                totals["tokens"] += answer.usage.completion_tokens
                spec = (answer.usage.model_extra or {})["tandem"].get("speculative") or {}
                totals["drafted"] += spec.get("drafted", 0)
                totals["accepted"] += spec.get("accepted", 0)
                totals["rounds"] += spec.get("verify_rounds", 0)

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chats))
        totals["wall_s"] = time.perf_counter() - started
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rtts", default="0,20,50", help="emulated RTTs in ms")
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    chats = prompts(args.requests)
    rows = []
    with EmbeddedNats() as nats:
        worker = WorkerProcess(nats, "spec-bench", cpu_cores="1")
        worker.start()
        worker.wait_ready()
        for rtt in [float(r) for r in args.rtts.split(",")]:
            os.sched_setaffinity(0, {0})  # the edge inherits core 0
            with EdgeProcess(nats_url=nats.url, emulated_rtt_ms=rtt, n_threads=1) as edge:
                os.sched_setaffinity(0, {0, 1})
                time.sleep(2.5)  # heartbeats: the edge sees the worker
                asyncio.run(run(edge, "speculative", chats[:1], 8, 1))  # warm-up
                for c in [int(x) for x in args.concurrency.split(",")]:
                    for route in ("cloud", "speculative"):
                        t = asyncio.run(run(edge, route, chats, args.max_tokens, c))
                        rows.append((rtt, c, route, t))
        worker.terminate()
    print(
        f"requests={args.requests} max_tokens={args.max_tokens} greedy; edge core 0, "
        "vLLM worker core 1; emulated RTT added per cloud request"
    )
    print(
        f"{'RTT ms':>7}{'conc':>6}  {'route':<12}{'tok/s':>8}{'accept':>8}{'tok/verify':>11}"
        f"{'cloud passes/token':>20}"
    )
    for rtt, c, route, t in rows:
        speculative = route == "speculative"
        accept = t["accepted"] / t["drafted"] if speculative and t["drafted"] else float("nan")
        per_verify = t["tokens"] / t["rounds"] if speculative and t["rounds"] else float("nan")
        passes = t["rounds"] / t["tokens"] if speculative else 1.0
        print(
            f"{rtt:>7.0f}{c:>6}  {route:<12}{t['tokens'] / t['wall_s']:>8.1f}{accept:>8.2f}"
            f"{per_verify:>11.2f}{passes:>20.3f}"
        )


if __name__ == "__main__":
    main()
