"""Edge throughput under concurrency: the batched engine against today's slot engine and
against raw batched ``llama_decode`` (the core's ceiling), per weight layout, same run.

For each layout (the shipped Q4_1 GGUF, its Q8_0 re-quantization) and each concurrency
level, three modes serve the same greedy chats, pinned to ``--core`` (the HTTP client on
``--client-core``):

- ``slots``: the edge with today's engine, ``min(c, --max-slots)`` llama.cpp contexts;
- ``batched``: the edge with ``batching: batched`` (one context, ``c`` sequences);
- ``raw``: no edge: one context with ``c`` sequences, each prompt prefilled in a
  ``llama_decode`` of its own, then one token per sequence per ``llama_decode`` (no
  sampling beyond argmax, no HTTP): what this core can do at all. Its TTFT is the time
  until every prompt is prefilled; its decode-only rate is reported beside it.

Repetitions are interleaved (slots, batched, raw, then again), each mode warmed up
first; the table gives the median and the range over repetitions. Aggregate tok/s is
generated tokens over the wall time of the whole level (prefill included); TTFT p50 and
p95 are per request, from the client's send to its first content token.

    python -m bench.edge_batching_bench --levels 1 8 32 --reps 2 --out bench-results/edge-batching
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.edge_bench import prompts as chats  # distinct one-turn chats
from models.catalog import DEFAULT_PAIR, Catalog
from models.chat_template import load_template, render_chat
from tandem.local import EdgeProcess

MODEL = DEFAULT_PAIR


def weights(layout: str) -> Path:
    """The GGUF of the default pair in ``layout`` (Q8_0 prepared once into TANDEM_HOME)."""
    from models.edge_weights import prepare_edge_weights

    pair = Catalog.load().get(MODEL)
    if layout != pair.edge.layout:
        pair = pair.model_copy(update={"edge": pair.edge.model_copy(update={"layout": layout})})
    return prepare_edge_weights(pair)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _via_api(edge: EdgeProcess, batch: list[list[dict[str, str]]], max_tokens: int,
                   concurrency: int) -> dict[str, float]:  # fmt: skip
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens: list[int] = []
    async with edge.async_client() as client:

        async def one(chat: list[dict[str, str]]) -> None:
            async with gate:
                t0, first = time.perf_counter(), True
                stream = await client.chat.completions.create(
                    model=MODEL, messages=chat, max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True},
                )  # type: ignore[call-overload]  # fmt: skip
                async for chunk in stream:
                    if first and chunk.choices and chunk.choices[0].delta.content:
                        ttfts.append(time.perf_counter() - t0)
                        first = False
                    if chunk.usage:
                        tokens.append(chunk.usage.completion_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in batch))
        wall = time.perf_counter() - started
    return {"tokens_per_s": sum(tokens) / wall, "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p95_ms": 1e3 * _pct(ttfts, 0.95), "tokens": sum(tokens)}  # fmt: skip


def raw(gguf: Path, batch: list[list[dict[str, str]]], max_tokens: int,
        threads: int) -> dict[str, float]:  # fmt: skip
    """Batched ``llama_decode`` with nothing around it: ``len(batch)`` sequences."""
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals

    from models.llama_loader import load_llama

    n = len(batch)
    llama = load_llama(gguf, n_ctx=512, n_threads=threads, verbose=False)
    template = load_template("chatml_tools")
    prompts = [
        llama.tokenize(render_chat(template, c).encode(), add_bos=False, special=True)
        for c in batch
    ]
    cells = sum(len(p) for p in prompts) + n * (max_tokens + 1)
    params = type(llama.context_params).from_buffer_copy(llama.context_params)
    params.n_ctx, params.n_seq_max, params.kv_unified = max(cells, 512), n, True
    params.n_batch = params.n_ubatch = max(n, max(len(p) for p in prompts))
    params.n_threads = params.n_threads_batch = threads
    ctx = _internals.LlamaContext(model=llama._model, params=params, verbose=False)
    lb = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = int(llama.n_vocab())

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        lb.token[i], lb.pos[i], lb.n_seq_id[i] = token, pos, 1
        lb.seq_id[i][0], lb.logits[i] = seq, logits

    def argmax(i: int) -> int:  # the logits of batch row i
        row = llama_cpp.llama_get_logits_ith(ctx.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    # Warm the context (its first decode allocates the compute graph), then empty it.
    lb.n_tokens = 0
    for s in range(n):
        put(s, prompts[s][0], 0, s, True)
    lb.n_tokens = n
    assert llama_cpp.llama_decode(ctx.ctx, lb) == 0
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx.ctx), -1, -1, -1)
    # Each prompt in a decode of its own: one ubatch holding every prompt makes each
    # token attend over all the sequences' cells (masked), slower than eight prefills
    # (measured: 2.2 s against the batched engine's 0.5 s for eight Q4_1 prompts).
    started = time.perf_counter()
    rows = []
    for s, p in enumerate(prompts):
        lb.n_tokens = 0
        for j, t in enumerate(p):
            put(lb.n_tokens, t, j, s, j == len(p) - 1)
            lb.n_tokens += 1
        assert llama_cpp.llama_decode(ctx.ctx, lb) == 0
        rows.append(argmax(lb.n_tokens - 1))
    prefill_s = time.perf_counter() - started

    nxt = rows
    pos = [len(p) for p in prompts]
    generated = n  # the first token of each came from the prefill
    for _ in range(max_tokens - 1):
        lb.n_tokens = 0
        for s in range(n):
            put(s, nxt[s], pos[s], s, True)
            pos[s] += 1
        lb.n_tokens = n
        assert llama_cpp.llama_decode(ctx.ctx, lb) == 0
        nxt = [argmax(s) for s in range(n)]
        generated += n
    wall = time.perf_counter() - started
    llama_cpp.llama_batch_free(lb)
    ctx.close()
    llama.close()
    return {"tokens_per_s": generated / wall, "ttft_p50_ms": 1e3 * prefill_s,
            "ttft_p95_ms": 1e3 * prefill_s, "tokens": generated,
            "decode_tokens_per_s": (generated - n) / (wall - prefill_s)}  # fmt: skip


def run_api(mode: str, gguf: Path, level: int, args: argparse.Namespace) -> dict[str, float]:
    options: dict[str, Any] = {"gguf": str(gguf), "n_threads": args.threads, "max_queue": 256}
    if mode == "batched":
        options.update(batching="batched", sequences=max(level, 1))
    else:
        options.update(slots=min(level, args.max_slots))
    batch = chats(max(args.min_requests, level))
    with EdgeProcess(cores=str(args.core), **options) as edge:
        asyncio.run(_via_api(edge, chats(2), 8, 1))  # warm-up
        return asyncio.run(_via_api(edge, batch, args.max_tokens, level))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--layouts", nargs="+", default=["gguf", "q8_0"])
    p.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=["slots", "batched", "raw"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=8, help="requests per level at least")
    p.add_argument("--max-slots", type=int, default=8, help="slot engine: contexts at most")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--out", default="bench-results/edge-batching")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {args.client_core})  # the client; the edges are pinned by taskset
    results: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for layout in args.layouts:
        gguf = weights(layout)
        raw(gguf, chats(2), 8, args.threads)  # warm-up: page the file in
        for rep in range(args.reps):
            for level in args.levels:
                for mode in args.modes:
                    if mode == "raw":
                        os.sched_setaffinity(0, {args.core})
                        r = raw(gguf, chats(level), args.max_tokens, args.threads)
                        os.sched_setaffinity(0, {args.client_core})
                    else:
                        r = run_api(mode, gguf, level, args)
                    row = {"layout": layout, "level": level, "mode": mode, "rep": rep, **r,
                           "load_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
                    results.append(row)
                    print(json.dumps(row), flush=True)
    summary = {"args": vars(args), "load_before": load_before, "load_after": os.getloadavg(),
               "rows": results}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Median (range) over repetitions, and the ratios the issue's targets are set in."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["layout"], r["level"], r["mode"]), []).append(r)

    def med(key: tuple[str, int, str], field: str) -> tuple[float, float, float]:
        values = [r[field] for r in cells.get(key, [])]
        return (statistics.median(values), min(values), max(values)) if values else (0, 0, 0)

    lines = ["| weights | streams | mode | tok/s median (range) | TTFT p50 ms | TTFT p95 ms | "
             "vs slots | vs raw | raw decode-only tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for layout, level, mode in sorted(cells, key=lambda k: (k[0], k[1], k[2])):
        tps, lo, hi = med((layout, level, mode), "tokens_per_s")
        slots = med((layout, level, "slots"), "tokens_per_s")[0]
        ceiling = med((layout, level, "raw"), "tokens_per_s")[0]
        lines.append(
            f"| {layout} | {level} | {mode} | {tps:.1f} ({lo:.1f}-{hi:.1f}) | "
            f"{med((layout, level, mode), 'ttft_p50_ms')[0]:.0f} | "
            f"{med((layout, level, mode), 'ttft_p95_ms')[0]:.0f} | "
            f"{tps / slots if slots else 0:.2f}x | {tps / ceiling if ceiling else 0:.2f} | "
            + (
                f"{med((layout, level, mode), 'decode_tokens_per_s')[0]:.1f} |"
                if mode == "raw"
                else " |"
            )
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
