"""Edge API overhead: the edge daemon over HTTP versus llama.cpp called directly, same run.

Both sides run the same model, thread count and greedy requests on the same
core (``--core``), one after the other; the HTTP client runs on another core
(``--client-core``), as a remote agent would, so the ratio isolates what the
edge's API layer adds (HTTP, JSON/SSE, queueing, detokenization). Prints TTFT p50 and tokens/s for
1 stream and N concurrent streams, and the ratios against the direct baseline.

    python -m bench.edge_bench --requests 8 --max-tokens 64 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from models.catalog import DEFAULT_PAIR, Catalog
from models.chat_template import load_template, render_chat
from models.convert import edge_gguf_path
from tandem.local import EdgeProcess

MODEL = DEFAULT_PAIR


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Distinct one-turn chats (no request reuses another's KV beyond the system header)."""
    topics = ["the sea", "a forest", "trains", "coffee", "winter", "bees", "a library", "bread"]
    return [
        [{"role": "user", "content": f"#{i}: write a long paragraph about {topics[i % 8]}."}]
        for i in range(n)
    ]


def direct(chats: list[list[dict[str, str]]], max_tokens: int, threads: int) -> dict[str, float]:
    """llama.cpp via llama-cpp-python, one request after another (one context)."""
    from llama_cpp import Llama

    llama = Llama(
        str(edge_gguf_path(Catalog.load().get(MODEL))),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    template = load_template("chatml_tools")
    ttfts, tokens, started = [], 0, time.perf_counter()
    for chat in chats:
        ids = llama.tokenize(render_chat(template, chat).encode(), add_bos=False, special=True)
        t0 = time.perf_counter()
        for i, tok in enumerate(
            llama.generate(ids, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
        ):
            if i == 0:
                ttfts.append(time.perf_counter() - t0)
            llama.detokenize([tok])
            tokens += 1
            if i + 1 >= max_tokens:
                break
    wall = time.perf_counter() - started
    llama.close()
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
    }


async def via_api(
    edge: EdgeProcess, chats: list[list[dict[str, str]]], max_tokens: int, concurrency: int
) -> dict[str, float]:
    """The edge's OpenAI API with the official client, streaming, N requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    counts: list[int] = []
    async with edge.async_client() as client:

        async def one(chat: list[dict[str, str]]) -> None:
            async with gate:
                t0 = time.perf_counter()
                n = 0
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=chat,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )  # type: ignore[arg-type]
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and not n:
                        ttfts.append(time.perf_counter() - t0)
                        n = 1
                    if chunk.usage:
                        counts.append(chunk.usage.completion_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chats))
        wall = time.perf_counter() - started
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "tokens_per_s": sum(counts) / wall,
        "tokens": sum(counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--core", type=int, default=0, help="core for llama.cpp (both sides)")
    parser.add_argument("--client-core", type=int, default=1, help="core for the HTTP client")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})  # the direct baseline, and the edge it spawns
    chats = prompts(args.requests)
    direct(chats[:2], 8, args.threads)  # warm-up: page in the model file
    base = direct(chats, args.max_tokens, args.threads)
    with EdgeProcess(n_threads=args.threads, slots=1) as edge:
        os.sched_setaffinity(0, {args.client_core})
        asyncio.run(via_api(edge, chats[:2], 8, 1))  # warm-up
        single = asyncio.run(via_api(edge, chats, args.max_tokens, 1))
        many = asyncio.run(via_api(edge, chats, args.max_tokens, args.concurrency))
    print(
        f"requests={args.requests} max_tokens={args.max_tokens} threads={args.threads} "
        f"llama.cpp core={args.core} client core={args.client_core}"
    )
    print(f"{'mode':<28}{'TTFT p50 ms':>12}{'tok/s':>10}{'tok/s ratio':>13}{'TTFT +ms':>10}")
    rows = [
        ("llama.cpp direct (baseline)", base),
        ("edge API, 1 stream", single),
        (f"edge API, {args.concurrency} concurrent", many),
    ]
    for name, r in rows:
        print(
            f"{name:<28}{r['ttft_p50_ms']:>12.1f}{r['tokens_per_s']:>10.1f}"
            f"{r['tokens_per_s'] / base['tokens_per_s']:>13.3f}"
            f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:>10.1f}"
        )
    print(
        "targets: tok/s ratio >= 0.95 (API adds < 5% to generation time); "
        "TTFT +ms < 10 at 1 stream (queueing adds to TTFT at N concurrent on one slot)"
    )


if __name__ == "__main__":
    main()
