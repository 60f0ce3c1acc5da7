"""vLLM's start time and decode speed, compiled (vLLM's default) against eager.

A worker's engine start is a scale-up's lead time (the planner's ``engine_start_s``)
and most of a cloud test module's setup. ``--enforce-eager`` skips torch.compile; this
measures what that saves at start and costs in decode, both modes in the same run,
each start in a fresh process (as a worker starts), pinned to one core like a worker.

    python -m bench.vllm_start --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("compiled", "eager")


async def _measure(mode: str, max_tokens: int, streams: int) -> dict[str, float]:
    """One engine of ``mode``: its start time, then 1-stream and ``streams``-stream tok/s."""
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from cloud.engine import VllmEngine
    from cloud.settings import CloudSettings
    from models.convert import prepare_cloud_weights

    # The worker's own arguments (``VllmEngine.engine_args``), so this measures its start.
    worker = VllmEngine(CloudSettings(enforce_eager=mode == "eager"))
    args = worker.engine_args(prepare_cloud_weights(worker.pair), None)
    started = time.perf_counter()
    llm = AsyncLLM.from_engine_args(args)
    start_s = time.perf_counter() - started
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(request_id: str) -> int:
        n = 0
        prompt = f"Tell me a long story, number {request_id}, about a dragon and a"
        async for out in llm.generate({"prompt": prompt}, sampling, request_id=request_id):
            n = len(out.outputs[0].token_ids)
        return n

    await one("warm-up")
    t = time.perf_counter()
    single = await one("single") / (time.perf_counter() - t)
    t = time.perf_counter()
    counts = await asyncio.gather(*(one(f"batch-{i}") for i in range(streams)))
    batched = sum(counts) / (time.perf_counter() - t)
    llm.shutdown()
    return {"start_s": start_s, "tok_s_1": single, f"tok_s_{streams}": batched}


def _child(mode: str, max_tokens: int, streams: int) -> dict[str, float]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    argv = [sys.executable, "-m", "bench.vllm_start", "--child", mode,
            "--max-tokens", str(max_tokens), "--streams", str(streams)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {mode} engine failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(_measure(args.child, args.max_tokens, args.streams))
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"load average before: {os.getloadavg()}")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # interleaved, so drift hits both modes alike
        for mode in MODES:
            runs[mode].append(_child(mode, args.max_tokens, args.streams))
    keys = list(runs["compiled"][0])
    print(f"| mode | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}")
    medians = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
    for mode in MODES:
        cells = [
            f"{medians[mode][k]:.1f} ({min(r[k] for r in runs[mode]):.1f}-"
            f"{max(r[k] for r in runs[mode]):.1f})"
            for k in keys
        ]
        print(f"| {mode} | {' | '.join(cells)} |")
    ratios = [f"{medians['eager'][k] / medians['compiled'][k]:.2f}x" for k in keys]
    print(f"| eager / compiled | {' | '.join(ratios)} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
