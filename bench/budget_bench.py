"""How far a tenant overshoots its fleet-wide cloud budget (``edge.fleet_usage``).

Several edges share one tenant's budget through a real nats-server's KV bucket.
Each edge admits a cloud answer while ``used(tenant) < budget`` (the check the
router makes) and counts the answer's tokens when it finishes; the answers are
SYNTHETIC (a sleep and a token count: no engine runs), the counters, their
compare-and-set and the sync are the real ones. The run ends when every edge has
refused for two sync intervals; the overshoot is the fleet total minus the budget,
printed beside the bound ``edge.fleet_usage`` states: the tokens in flight when
the budget was crossed plus what the other edges counted in two sync intervals.

    python -m bench.budget_bench --edges 4 --budget 20000 --answer-tokens 200 \\
        --answers-per-s 20 --sync-s 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import nats

from edge.fleet_usage import FleetUsage
from mesh.server import EmbeddedNats

TENANT = "acme"


@dataclass
class Run:
    edges: int
    budget: int
    answer_tokens: int
    answers_per_s: float  # per edge
    answer_s: float  # how long one answer takes
    sync_s: float
    total: int = 0
    overshoot: int = 0
    bound: float = 0.0
    conflicts: int = 0


async def _edge(usage: FleetUsage, run: Run, stop: asyncio.Event) -> None:
    inflight: set[asyncio.Task[None]] = set()

    async def answer() -> None:
        await asyncio.sleep(run.answer_s)
        usage.add(TENANT, run.answer_tokens)

    while not stop.is_set():
        if usage.used(TENANT) < run.budget:
            task = asyncio.create_task(answer())
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        await asyncio.sleep(1 / run.answers_per_s)
    await asyncio.gather(*inflight)


async def measure(run: Run) -> Run:
    with EmbeddedNats() as hub:
        ncs = [await nats.connect(hub.url) for _ in range(run.edges)]
        try:
            await FleetUsage.create_bucket(ncs[0])
            usages = [FleetUsage(nc, sync_s=run.sync_s) for nc in ncs]
            for u in usages:
                await u.start()
            stop = asyncio.Event()
            edges = [asyncio.create_task(_edge(u, run, stop)) for u in usages]
            while True:  # until every edge sees the budget spent for two sync intervals
                await asyncio.sleep(run.sync_s)
                if all(u.used(TENANT) >= run.budget for u in usages):
                    await asyncio.sleep(2 * run.sync_s)
                    if all(u.used(TENANT) >= run.budget for u in usages):
                        break
            stop.set()
            await asyncio.gather(*edges)
            for u in usages:
                await u.stop()  # the last counts are written
            reader = FleetUsage(ncs[0])
            reader.used(TENANT)
            await reader.sync()
            run.total = reader.used(TENANT)
            run.conflicts = sum(u.conflicts for u in usages)
        finally:
            for nc in ncs:
                await nc.close()
    run.overshoot = run.total - run.budget
    rate = run.answers_per_s * run.answer_tokens  # tokens/s each edge adds
    in_flight = run.edges * rate * run.answer_s
    # ... plus two sync intervals of the other edges: one until they write, one until we read.
    run.bound = in_flight + (run.edges - 1) * rate * 2 * run.sync_s
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--budget", type=int, default=20_000)
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--answers-per-s", type=float, default=20.0)
    parser.add_argument("--answer-s", type=float, default=0.5)
    parser.add_argument("--sync-s", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="write the runs as JSON here")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        run = Run(args.edges, args.budget, args.answer_tokens, args.answers_per_s,
                  args.answer_s, args.sync_s)  # fmt: skip
        runs.append(asyncio.run(measure(run)))
        r = runs[-1]
        print(
            f"edges={r.edges} budget={r.budget} total={r.total} overshoot={r.overshoot} "
            f"({100 * r.overshoot / r.budget:.1f}%) bound={r.bound:.0f} conflicts={r.conflicts}"
        )
    overs = [r.overshoot for r in runs]
    load = os.getloadavg()
    print(
        f"overshoot median {statistics.median(overs)} (min {min(overs)}, max {max(overs)}); "
        f"stated bound {runs[0].bound:.0f}; load average {load[0]:.2f}"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                {"runs": [asdict(r) for r in runs], "load_average": load,
                 "note": "SYNTHETIC answers (sleep + token count); real NATS KV counters",
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                f, indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()
