"""Speculative route versus cloud-only: cloud engine-seconds per token and end-to-end speed.

The edge (llama.cpp) and one vLLM worker run as real processes on one NATS, the
edge and this script's HTTP client pinned to core 0, the worker and its engine
to core 1. The edge adds an emulated WAN round trip to every cloud request
(``TANDEM_EDGE_EMULATED_RTT_MS``: half before the request, half after the reply).
For each RTT and number of concurrent sessions, the same greedy requests go
through the cloud-only route and the speculative route, one after the other.

Reported per cell:

- cloud engine-seconds per output token: the worker's ``engine_busy_s`` (wall
  seconds during which vLLM had at least one request in it, read from its
  ``$SRV.STATS``) over the cell, divided by the output tokens;
- the tokens the engine computed per output token (``engine_tokens_computed``:
  prompt tokens not read from the prefix cache, plus generated ones), and their
  price at the cloud-only cell's busy seconds per computed token: what the route
  costs an engine shared with other traffic, where a request pays its share of each
  step rather than a whole step it runs alone in;
- end-to-end output tokens/s (all sessions together);
- acceptance rate, tokens per verification, and the share of rounds whose
  draft was drafted during the previous round trip (pipelining).

All edges of the run share core 0: 32 concurrent sessions on one edge core is
32 devices' drafting on one core, so speculative tokens/s at high concurrency
is bounded by that core, not by the cloud.

    python -m bench.speculative_bench --quick      # RTT 20 ms, 1 and 8 sessions
    python -m bench.speculative_bench              # RTT 0/20/50 ms x 1/8/32 sessions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats

from mesh import subjects
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess, WorkerProcess, local_nats
from tandem.supervisor import Supervisor

MODEL = DEFAULT_PAIR
TOPICS = ["the sea", "trains", "coffee", "winter", "bees", "a library", "bread", "the moon"]
EDGE_CORE, CLOUD_CORE = 0, 1


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Distinct greedy requests."""
    return [[{"role": "user", "content": f"Write about {TOPICS[i % 8]} ({i})."}] for i in range(n)]


@dataclass
class Cell:
    """One route at one RTT and concurrency: what it produced and what it cost."""

    rtt_ms: float
    sessions: int
    route: str
    requests: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    pipelined: int = 0
    wall_s: float = 0.0
    cloud_busy_s: float = 0.0
    cloud_tokens_computed: int = 0  # prompt tokens not cached, plus generated
    extra: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, float]:
        """The reported figures."""
        nan = float("nan")
        return {
            "tokens_per_s": self.tokens / self.wall_s,
            "cloud_ms_per_token": 1000 * self.cloud_busy_s / max(1, self.tokens),
            "computed_per_token": self.cloud_tokens_computed / max(1, self.tokens),
            "acceptance": self.accepted / self.drafted if self.drafted else nan,
            "tokens_per_verify": self.tokens / self.rounds if self.rounds else nan,
            "pipelined_share": self.pipelined / self.rounds if self.rounds else nan,
        }


async def cloud_cost(nats_url: str) -> tuple[float, int]:
    """The worker's cumulative engine busy seconds and tokens computed, from its
    micro-service STATS."""
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(f"$SRV.STATS.{subjects.cloud_service_name(MODEL)}", b"", timeout=5)
    finally:
        await nc.close()
    data = json.loads(reply.data)["endpoints"][0]["data"]
    return float(data["engine_busy_s"]), int(data["engine_tokens_computed"])


async def run(
    edge: EdgeProcess, nats_url: str, cell: Cell, chats: list[list[dict[str, str]]], max_tokens: int
) -> None:
    """Send every chat on the cell's route, ``cell.sessions`` at a time; fill in the cell."""
    gate = asyncio.Semaphore(cell.sessions)
    async with edge.async_client(timeout=900) as client:

        async def one(chat: list[dict[str, str]]) -> None:
            async with gate:
                answer = await client.chat.completions.create(
                    model=MODEL,
                    messages=chat,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_headers={"x-tandem-route": cell.route},
                )
            assert answer.usage is not None
            tandem = (answer.usage.model_extra or {})["tandem"]
            assert tandem["route"] == cell.route, tandem  # never silently served elsewhere
            cell.tokens += answer.usage.completion_tokens
            spec = tandem.get("speculative") or {}
            cell.drafted += spec.get("drafted", 0)
            cell.accepted += spec.get("accepted", 0)
            cell.rounds += spec.get("verify_rounds", 0)
            cell.pipelined += spec.get("pipelined_rounds", 0)

        busy_before, computed_before = await cloud_cost(nats_url)
        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chats))
        cell.wall_s = time.perf_counter() - started
        busy_after, computed_after = await cloud_cost(nats_url)
        cell.cloud_busy_s = busy_after - busy_before
        cell.cloud_tokens_computed = computed_after - computed_before
        cell.requests = len(chats)


def grid(args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """The RTTs and session counts to run."""
    if args.quick:
        return [20.0], [1, 8]
    return [float(r) for r in args.rtts.split(",")], [int(c) for c in args.sessions.split(",")]


def grid_run(
    mesh: EmbeddedNats, rtts: list[float], sessions: list[int], args: argparse.Namespace
) -> list[Cell]:
    """Every cell of the grid, one edge per RTT, cloud-only then speculative."""
    cells: list[Cell] = []
    for rtt in rtts:
        edge_options: dict[str, object] = {"slots": max(sessions), "n_ctx": 512, "n_threads": 1}
        if args.edge_batching == "batched":  # one context, the sessions' drafts batched
            edge_options = {"batching": "batched", "sequences": max(sessions), "n_threads": 1}
        if args.edge_layout != "gguf":  # the drafter's weights re-quantized (acceptance)
            from bench.edge_batching_bench import weights

            edge_options["gguf"] = str(weights(args.edge_layout))
        with EdgeProcess(nats_url=mesh.url, emulated_rtt_ms=rtt, **edge_options) as edge:
            time.sleep(2.5)  # heartbeats: the edge sees the worker
            for n in sessions:
                chats = prompts(max(n, args.min_requests))
                for route in ("cloud", "speculative"):
                    # Unmeasured: vLLM-CPU compiles once per new batch shape.
                    asyncio.run(run(edge, mesh.url, Cell(rtt, n, route), chats[:n], 8))
                for route in ("cloud", "speculative"):
                    cell = Cell(rtt, n, route)
                    asyncio.run(run(edge, mesh.url, cell, chats, args.max_tokens))
                    cells.append(cell)
                    print(f"done: {asdict(cell)} {cell.row()}", flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="RTT 20 ms, 1 and 8 sessions")
    parser.add_argument("--rtts", default="0,20,50", help="emulated RTTs in ms")
    parser.add_argument("--sessions", default="1,8,32", help="concurrent sessions")
    parser.add_argument("--min-requests", type=int, default=4, help="requests per cell, at least")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the cells here")
    parser.add_argument(
        "--edge-batching", choices=["slots", "batched"], default="slots",
        help="the edge engine: a llama.cpp context per session, or one batched context",
    )  # fmt: skip
    parser.add_argument(
        "--edge-layout", choices=["gguf", "q8_0"], default="gguf",
        help="the drafter's weights: the shipped GGUF, or re-quantized to Q8_0",
    )  # fmt: skip
    args = parser.parse_args()
    rtts, sessions = grid(args)
    with Supervisor() as supervisor, local_nats(supervisor) as mesh:
        os.sched_setaffinity(0, {CLOUD_CORE})  # the worker and its engine inherit core 1
        os.environ["TANDEM_CLOUD_CPU_CORES"] = str(CLOUD_CORE)  # vLLM's OMP threads too
        # Verification re-sends the context each round; vLLM-CPU's default 128-token
        # blocks would leave up to 127 of its tokens to recompute every time.
        os.environ.setdefault("TANDEM_CLOUD_BLOCK_SIZE", "32")
        worker = WorkerProcess(mesh, "spec-bench", supervisor=supervisor)
        worker.start()
        try:
            os.sched_setaffinity(0, {EDGE_CORE})  # edges and this client: core 0
            worker.wait_ready()
            cells = grid_run(mesh, rtts, sessions, args)
        finally:
            if worker.alive:
                worker.kill9()  # its vLLM processes too; a benchmark needs no drain
    report(cells, args)


def report(cells: list[Cell], args: argparse.Namespace) -> None:
    """A table (speculative next to cloud-only, with the ratios) and optional JSON."""
    print(
        f"\nmax_tokens={args.max_tokens}, greedy, fp32 cloud, KV block "
        f"{os.environ['TANDEM_CLOUD_BLOCK_SIZE']}; edge engine {args.edge_batching}, "
        f"edge weights {args.edge_layout}, "
        f"edge+client core {EDGE_CORE}, "
        f"vLLM worker core {CLOUD_CORE}; load {os.getloadavg()[0]:.2f} at the end"
    )
    # Two costs per output token: engine busy time (a verification alone in a step pays
    # the whole step), and the share of shared steps: the tokens the route had the
    # engine compute, priced at the cloud-only cell's busy ms per computed token (step
    # time grows with its tokens on this CPU).
    head = (
        f"{'RTT':>4}{'sess':>5}  {'route':<12}{'tok/s':>7}{'cloud ms/tok':>13}"
        f"{'computed/tok':>13}{'share ms/tok':>13}"
        f"{'accept':>8}{'tok/verify':>11}{'pipelined':>10}{'cost ratio':>11}"
        f"{'share ratio':>12}{'speed ratio':>12}"
    )
    print(head)
    base: dict[tuple[float, int], dict[str, float]] = {}
    for cell in cells:
        r = cell.row()
        if cell.route == "cloud":
            base[(cell.rtt_ms, cell.sessions)] = r
        b = base[(cell.rtt_ms, cell.sessions)]
        ms_per_computed = b["cloud_ms_per_token"] / max(b["computed_per_token"], 1e-9)
        r["share_ms_per_token"] = r["computed_per_token"] * ms_per_computed
        ratios = f"{'':>11}{'':>12}{'':>12}"
        if cell.route != "cloud":
            cost = r["cloud_ms_per_token"] / b["cloud_ms_per_token"]
            share = r["share_ms_per_token"] / b["cloud_ms_per_token"]
            speed = r["tokens_per_s"] / b["tokens_per_s"]
            ratios = f"{cost:>10.2f}x{share:>11.2f}x{speed:>11.2f}x"
        cell.extra["share_ms_per_token"] = r["share_ms_per_token"]
        print(
            f"{cell.rtt_ms:>4.0f}{cell.sessions:>5}  {cell.route:<12}{r['tokens_per_s']:>7.1f}"
            f"{r['cloud_ms_per_token']:>13.2f}{r['computed_per_token']:>13.2f}"
            f"{r['share_ms_per_token']:>13.2f}{r['acceptance']:>8.2f}"
            f"{r['tokens_per_verify']:>11.2f}{r['pipelined_share']:>10.2f}{ratios}"
        )
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), **c.row()} for c in cells], indent=1))


if __name__ == "__main__":
    main()
