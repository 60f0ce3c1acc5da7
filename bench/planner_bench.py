"""Planner benchmark (SIMULATED ENGINE): one compressed day of bursty agentic traffic
through the real mesh and the real planner, under four fleet policies.

Everything but the forward pass is real: an embedded nats-server, ``--hosts`` fleet
host processes each running simulated cloud workers (``CloudWorker`` +
``SimVllmEngine`` on the calibrated latency profile, each its own NATS connection and
micro service), the real ``cloud.planner.Planner`` with its lease, live configuration
and decisions, and the agents' calls as mesh requests (``GenerateRequest`` to the
model's queue group, the stream back to an inbox, as an edge sends them). A new
replica serves only ``--engine-start-s`` after it is ordered (vLLM-CPU takes 70-100 s).

The trace (seeded, ``--seed``): the number of active agent sessions follows a diurnal
curve over ``--duration-s`` seconds (one day compressed into 20 minutes by default),
from ``--trough-sessions`` at night to ``--peak-sessions`` in the afternoon (a raised
cosine, trough at t=0; the run opens on the night's sessions already running), with
bursts on top. By default (``--burst-model intervals``) they are BurstGPT's: the gaps
between session starts are Gamma-distributed with shape ``--burst-shape`` (0.5: a
squared coefficient of variation of 2, against 1 for Poisson arrivals; BurstGPT fits
Gamma gaps to Azure's conversation traffic, shape < 1 being burstier) at the diurnal
rate. ``--burst-model windows`` is a harsher stress: the start rate times a
Gamma(``--burst-shape``, mean 1) factor redrawn every ``--burst-every-s`` seconds, so a
window may bring several times the curve's rate. A session is
2-6 calls; between calls the agent thinks or runs a tool for a lognormal time
(median ``--gap-median-s``); each call has a prompt of 20-120 words and asks for
16-64 tokens. The arrival rate is about sessions / (gap + call time).

Policies, each on a fresh mesh replaying the same trace, side by side (each policy a
process with its own nats-server and fleet hosts; ``--sequential`` runs them one after
the other):

- ``static-peak``: a fixed fleet sized, with the same capacity model as the planner,
  for the trace's peak arrival rate;
- ``static-mean``: a fixed fleet sized for its mean rate;
- ``reactive``: the planner in ``reactive`` mode (KEDA/HPA-like: in-flight requests per
  replica against a threshold, no forecast);
- ``predictive``: the planner (a damped-trend forecast over the engine-start lead
  time, queue guard).

Both planner policies scale down the same way: to the most replicas asked for within
the scale-down window (``--scale-down-cooldown-s``; unset, the engine's start time),
the whole excess in one step, each drained worker finishing its requests.

Per policy: SLO attainment (share of calls whose TTFT meets ``--ttft-ms``; a lost or
failed call misses), P95/P99 call and session latency, worker-hours (provisioned
worker time, starting replicas included), mean engine utilization (engine busy time
over provisioned time), requests lost, scale actions. JSON, a Markdown table and a
plot of demand, replicas and TTFT over time per policy go to ``--out``.

The defaults fit this 2-core machine (60 to 1,200 sessions, peaking near 52 calls/s:
the whole mesh tops out near 115 calls/s here). The paper's 12,000 sessions at the same
think times is ~520 calls/s, which would measure the harness, not the planner
(docs/bench/planner/static_peak_client_bound.json is such a run); on a bigger machine
raise ``--peak-sessions``. Each policy's CPU by role (harness, fleet, NATS) and the load
average are recorded, so a run that saturated the machine shows it.

    python -m bench.planner_bench --smoke                      # ~2 minutes, tiny
    python -m bench.planner_bench            # the full run: 4 policies at once, ~25 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.catalog import DEFAULT_PAIR

LABEL = "SIMULATED ENGINE"
MODEL = DEFAULT_PAIR
POLICIES = ("static-peak", "static-mean", "reactive", "predictive")
# Mean prompt tokens of a call, measured: 300 of the trace's prompts rendered with the
# catalog template and tokenized by the simulated engine average 102.3 (70 words of one
# token each, plus the template's 32). Until 2026-12-02 this was guessed at 121.
PROMPT_TOKENS = 102.0
WORDS = "plan file test build deploy check error result value list index query table user".split()


# -- the trace ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionPlan:
    """One agent session: when it starts, its calls (prompt words, max tokens), its gaps."""

    start_s: float
    calls: list[tuple[int, int]]
    gaps_s: list[float]


def sessions_at(t: float, args: argparse.Namespace) -> float:
    """Active sessions the diurnal curve asks for at ``t`` (trough at 0, peak mid-run)."""
    phase = (1 - math.cos(2 * math.pi * t / args.duration_s)) / 2
    return args.trough_sessions + (args.peak_sessions - args.trough_sessions) * phase


def make_trace(args: argparse.Namespace) -> list[SessionPlan]:
    """The seeded sessions of one run (Little's law: start rate = active / session length).

    The night before t=0 is replayed at the trough's rate and clipped at 0: the run
    opens on the trough's sessions already part-way through their tasks (the steady
    state), not on an empty mesh whose first sessions all start together.
    """
    rng = random.Random(args.seed)
    mean_gap = args.gap_median_s * math.exp(args.gap_sigma**2 / 2)
    mean_calls = 4.0
    session_s = mean_calls * args.call_s + (mean_calls - 1) * mean_gap
    night_s = 4 * session_s  # longer than all but a vanishing share of sessions
    plans, t, burst, next_burst = [], -night_s, 1.0, 0.0
    while t < args.duration_s:
        rate = sessions_at(max(t, 0.0), args) / session_s
        if args.burst_model == "intervals":  # BurstGPT's model: Gamma(k) gaps, mean 1/rate
            t += rng.gammavariate(args.burst_shape, 1 / (args.burst_shape * max(rate, 1e-9)))
        else:  # "windows": the rate itself times a Gamma(k, 1/k) factor, per window
            if t >= next_burst:
                burst = rng.gammavariate(args.burst_shape, 1 / args.burst_shape)
                next_burst = t + args.burst_every_s
            step = rng.expovariate(max(rate * (burst if t >= 0 else 1.0), 1e-9))
            if t + step >= next_burst:
                # The rate changes first. Arrivals are memoryless, so draw again from
                # there: a step drawn at a near-zero factor would otherwise skip the
                # windows after it (this generator once lost most of its afternoons so).
                t = next_burst
                continue
            t += step
        n = rng.randint(2, 6)
        calls = [(rng.randint(20, 120), rng.randint(16, 64)) for _ in range(n)]
        gaps = [
            rng.lognormvariate(math.log(args.gap_median_s), args.gap_sigma) for _ in range(n - 1)
        ]
        plan = _from(SessionPlan(t, calls, gaps), 0.0, args.call_s)
        if plan is not None and plan.start_s < args.duration_s:
            plans.append(plan)
    return plans


def _from(plan: SessionPlan, at_s: float, call_s: float) -> SessionPlan | None:
    """The part of ``plan`` from ``at_s`` on (its calls at their planned times, each
    lasting ``call_s``); None when it ended before."""
    t = plan.start_s
    for i in range(len(plan.calls)):
        if t >= at_s:
            return SessionPlan(t, plan.calls[i:], plan.gaps_s[i:])
        t += call_s + (plan.gaps_s[i] if i < len(plan.gaps_s) else 0.0)
    return None


def arrival_rates(trace: list[SessionPlan], args: argparse.Namespace, bin_s: float) -> list[float]:
    """Expected call arrivals per second in each bin (calls placed at their planned times)."""
    bins = [0.0] * (math.ceil(args.duration_s / bin_s) + 1)
    for plan in trace:
        at = plan.start_s
        for i in range(len(plan.calls)):
            if at < args.duration_s:
                bins[int(at // bin_s)] += 1 / bin_s
            at += args.call_s + (plan.gaps_s[i] if i < len(plan.gaps_s) else 0)
    return bins


# -- the simulated fleet (host processes) ------------------------------------------------------


def host_main(spec: dict[str, Any]) -> None:
    """A fleet host: starts and drains simulated workers on its control subject."""
    import logging
    import signal

    from cloud.settings import CloudSettings
    from cloud.sim_engine import SimVllmEngine
    from cloud.worker import CloudWorker
    from mesh import subjects
    from mesh.connection import connect

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> None:
        nc = await connect(spec["nats_url"], name=f"simfleet-{spec['host_id']}")
        vocab: Any = None
        workers: dict[str, tuple[CloudWorker, SimVllmEngine]] = {}
        starting: dict[str, asyncio.Task[None]] = {}
        stopping: set[asyncio.Task[None]] = set()

        async def start(worker_id: str, delay_s: float) -> None:
            nonlocal vocab
            await asyncio.sleep(delay_s)  # the engine's start time
            settings = CloudSettings.model_validate(
                {"nats_url": spec["nats_url"], "worker_id": worker_id, "engine": "sim",
                 "kv_cache_gb": 1, "http_port": 0, "stream_interval": 8}
            )  # fmt: skip
            engine = SimVllmEngine(settings, vocab=vocab)
            await engine.start()
            vocab = engine.vocab
            worker = CloudWorker(settings, engine)
            await worker.start()
            workers[worker_id] = (worker, engine)

        async def stop(worker_id: str) -> None:
            task = starting.pop(worker_id, None)
            if task is not None and not task.done():
                task.cancel()
                return
            worker, engine = workers.pop(worker_id)
            await worker.drain()  # in-flight requests finish
            engine.shutdown()

        async def on_control(msg: Any) -> None:
            command = json.loads(msg.data)
            worker_id = command["worker_id"]
            if command["op"] == "start":
                starting[worker_id] = asyncio.create_task(start(worker_id, command["delay_s"]))
            else:
                stopping.add(task := asyncio.create_task(stop(worker_id)))
                task.add_done_callback(stopping.discard)
            await msg.respond(b'{"ok": true}')

        await nc.subscribe(subjects.sim_fleet_host(spec["host_id"]), cb=on_control)
        await nc.flush()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        print("ready", flush=True)
        await done.wait()
        for worker_id in list(workers):
            await stop(worker_id)
        await nc.drain()

    asyncio.run(run())


class SimFleetConnector:
    """The planner's connector to the fleet hosts (the ``Connector`` protocol)."""

    def __init__(self, nc: Any, hosts: list[str], start_delay_s: float) -> None:
        self._nc, self._hosts, self._delay = nc, hosts, start_delay_s
        self._where: dict[str, str] = {}  # worker id: host
        self._next = 0
        self.intervals: dict[str, list[float]] = {}  # worker id: [ordered_at, removed_at]
        self.actions = 0

    async def _send(self, host: str, op: str, worker_id: str, delay_s: float = 0.0) -> None:
        from cloud.planner_config import ConnectorError
        from mesh import subjects

        body = json.dumps({"op": op, "worker_id": worker_id, "delay_s": delay_s}).encode()
        try:
            await self._nc.request(subjects.sim_fleet_host(host), body, timeout=5)
        except Exception as exc:
            raise ConnectorError(
                f"fleet host {host} did not answer {op} {worker_id}: {exc}"
            ) from exc

    async def workers(self) -> list[str]:
        return sorted(self._where)

    async def scale_up(self, count: int, *, delay_s: float | None = None) -> list[str]:
        ids = []
        for _ in range(count):
            worker_id = f"sim-{self._next}"
            self._next += 1
            host = min(self._hosts, key=lambda h: sum(1 for w in self._where.values() if w == h))
            await self._send(host, "start", worker_id, self._delay if delay_s is None else delay_s)
            self._where[worker_id] = host
            self.intervals[worker_id] = [time.monotonic(), math.nan]
            ids.append(worker_id)
        self.actions += 1
        return ids

    async def drain(self, worker_id: str) -> None:
        host = self._where.pop(worker_id)
        await self._send(host, "stop", worker_id)
        self.intervals[worker_id][1] = time.monotonic()
        self.actions += 1

    def removable(self, worker_ids: list[str]) -> list[str]:
        return list(worker_ids)


# -- what the run cost the machine ------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU cores used per role over the run: the harness (agents and planner, this
    process), the fleet hosts (the simulated workers), nats-server; and the machine's
    busy share. A harness near a full core would set the latencies itself."""

    pids: dict[str, list[int | None]]
    start: dict[str, float] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    t: float = 0.0

    def _read(self) -> dict[str, float]:
        from bench.scale_bench import cpu_seconds

        return {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in self.pids.items()}

    def begin(self) -> None:
        from bench.scale_bench import _machine_busy

        self.start, self.machine, self.t = self._read(), _machine_busy(), time.monotonic()

    def cores(self) -> dict[str, float]:
        from bench.scale_bench import _machine_busy

        window = max(1e-6, time.monotonic() - self.t)
        now, (busy, total) = self._read(), _machine_busy()
        cores = {role: round((now[role] - self.start[role]) / window, 2) for role in now}
        cores["machine_busy_share"] = round(
            (busy - self.machine[0]) / max(1.0, total - self.machine[1]), 3
        )
        return cores


# -- the agents (clients on the mesh) -----------------------------------------------------------


@dataclass
class Call:
    at_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    outcome: str = "lost"  # ok | error | lost
    retries: int = 0


@dataclass
class Agents:
    """The run's agents: they place calls on the mesh and record what they saw."""

    nc: Any
    mux: Any
    t0: float
    calls: list[Call] = field(default_factory=list)
    sessions_s: list[float] = field(default_factory=list)
    active: int = 0

    async def call(self, words: int, max_tokens: int, rng: random.Random) -> Call:
        from mesh import subjects
        from mesh.protocol import ErrorInfo, GenerateRequest, SamplingParams, TokenChunk

        record = Call(at_s=time.monotonic() - self.t0)
        self.calls.append(record)
        started = time.monotonic()
        content = " ".join(rng.choice(WORDS) for _ in range(words))
        for attempt in range(4):
            inbox, chunks = await self.mux.open(self.nc)
            request = GenerateRequest(
                request_id=uuid.uuid4().hex, model=MODEL, reply_subject=inbox,
                messages=[{"role": "user", "content": content}],
                sampling=SamplingParams(max_tokens=max_tokens), deadline=time.time() + 120,
            )  # fmt: skip
            try:
                reply = await self.nc.request(
                    subjects.cloud_generate(MODEL), request.to_bytes(), timeout=5
                )
                if ErrorInfo.from_service_headers(reply.headers) is not None:  # draining: retry
                    record.retries = attempt + 1
                    continue
                while True:
                    chunk = TokenChunk.from_bytes((await asyncio.wait_for(chunks.get(), 60)).data)
                    if chunk.token_ids and record.ttft_s is None:
                        record.ttft_s = time.monotonic() - started
                    if chunk.is_end:
                        record.outcome = "error" if chunk.error else "ok"
                        record.e2e_s = time.monotonic() - started
                        return record
            except Exception as exc:  # no responder yet, timeout: retry, then lost
                record.retries = attempt + 1
                if attempt == 3:
                    record.outcome = "lost" if "Timeout" in type(exc).__name__ else "error"
                await asyncio.sleep(0.5)
            finally:
                self.mux.close(inbox)
        if record.outcome == "lost" and record.ttft_s is None and record.retries == 4:
            record.outcome = "error"  # refused every time (draining workers): failed, not lost
        return record

    async def session(self, plan: SessionPlan, seed: int) -> None:
        rng = random.Random(seed)
        await asyncio.sleep(max(0.0, self.t0 + plan.start_s - time.monotonic()))
        self.active += 1
        total = 0.0
        try:
            for i, (words, max_tokens) in enumerate(plan.calls):
                record = await self.call(words, max_tokens, rng)
                total += record.e2e_s if record.e2e_s is not None else 120.0
                if i < len(plan.gaps_s):
                    await asyncio.sleep(plan.gaps_s[i])
        finally:
            self.active -= 1
        self.sessions_s.append(total)


# -- one policy --------------------------------------------------------------------------


def capacity(args: argparse.Namespace) -> float:
    """One replica's arrivals per second within the SLO, from the latency profile."""
    from cloud.planner import replica_capacity_rps
    from models.latency import LatencyProfile

    profile = LatencyProfile.default().cloud
    return replica_capacity_rps(
        profile, PROMPT_TOKENS, 40, args.ttft_ms / 1e3, args.itl_ms / 1e3, args.ttft_quantile
    )


def planner_config(args: argparse.Namespace, cap: float) -> Any:
    from cloud.planner_config import PlannerConfig

    sample_s = max(2.0, args.duration_s / 200)
    return PlannerConfig.model_validate(
        {
            "model": MODEL,
            "slo": {"ttft_p95_ms": args.ttft_ms, "itl_p95_ms": args.itl_ms},
            "bounds": {"min_replicas": 1, "max_replicas": args.max_replicas},
            "workload": {"prompt_tokens": PROMPT_TOKENS, "output_tokens": 40, "cached_share": 0.0},
            "forecaster": args.forecaster,
            "season_periods": 0,
            **{
                key: getattr(args, key)
                for key in ("trend_damping", "band_z")
                if getattr(args, key, None) is not None
            },
            "sample_s": sample_s,
            "tick_s": 1.0,
            "engine_start_s": args.engine_start_s,
            "scale_down_cooldown_s": args.scale_down_cooldown_s,
            "utilization_target": args.utilization_target,
            "ttft_quantile": args.ttft_quantile,
            # Reactive: as many in flight per replica as the derived capacity keeps busy.
            "in_flight_per_replica": max(1.0, cap * (args.ttft_ms / 1e3 + 40 * args.itl_ms / 1e3)),
        }
    )


async def run_policy(
    policy: str, args: argparse.Namespace, trace: list[SessionPlan]
) -> dict[str, Any]:
    from cloud.planner import Mode, Planner
    from mesh import subjects
    from mesh.connection import connect
    from mesh.heartbeat import FleetView
    from mesh.inbox import InboxMux
    from mesh.protocol import NodeHeartbeat
    from models.latency import LatencyProfile
    from tandem.local import local_nats
    from tandem.supervisor import Supervisor

    cap = capacity(args)
    rates = arrival_rates(trace, args, bin_s=10.0)
    peak_rps, mean_rps = max(rates), statistics.fmean(rates)
    initial = {
        "static-peak": math.ceil(peak_rps / (cap * args.utilization_target)),
        "static-mean": math.ceil(mean_rps / (cap * args.utilization_target)),
    }.get(policy, max(1, math.ceil(rates[0] / (cap * args.utilization_target))))
    with Supervisor() as supervisor, local_nats(supervisor) as nats:
        hosts = [f"h{i}" for i in range(args.hosts)]
        children = [
            supervisor.start(
                f"host-{h}",
                [
                    sys.executable,
                    "-m",
                    "bench.planner_bench",
                    "--host-spec",
                    json.dumps({"nats_url": nats.url, "host_id": h}),
                ],
                log_path=Path(args.out) / f"{policy}-{h}.log",
            )
            for h in hosts
        ]
        nc = await connect(nats.url, name="planner-bench")
        for h in hosts:  # each host subscribed to its control subject
            deadline = time.monotonic() + 60
            while not nats.subscribers(subjects.sim_fleet_host(h)):
                assert time.monotonic() < deadline and all(c.alive for c in children), "hosts"
                await asyncio.sleep(0.2)
        fleet = SimFleetConnector(nc, hosts, args.engine_start_s)
        await fleet.scale_up(initial, delay_s=0.0)  # the fleet at t=0 is already up
        fleet.actions = 0
        busy: dict[str, float] = {}

        async def on_beat(msg: Any) -> None:
            beat = NodeHeartbeat.from_bytes(msg.data)
            busy[beat.node_id] = max(busy.get(beat.node_id, 0.0), beat.load.engine_busy_s)

        await nc.subscribe(subjects.all_node_loads(), cb=on_beat)
        view = FleetView(nc)
        await view.start()
        deadline = time.monotonic() + 120
        while len([b for b in view.nodes() if b.role == "cloud"]) < initial:
            assert time.monotonic() < deadline, "the initial fleet did not come up"
            await asyncio.sleep(0.2)
        planner = None
        if policy in ("reactive", "predictive"):
            mode: Mode = "reactive" if policy == "reactive" else "predictive"
            planner = Planner(
                nc, f"bench-{policy}", fleet, profile=LatencyProfile.default().cloud,
                config=planner_config(args, cap), mode=mode,
            )  # fmt: skip
            await planner.start()
        meter = CpuMeter(
            {"harness": [os.getpid()], "fleet": [c.pid for c in children], "nats": [nats.pid]}
        )
        meter.begin()
        load_before = os.getloadavg()
        t0 = time.monotonic()
        agents = Agents(nc, InboxMux(), t0)
        timeline: list[dict[str, float]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                ready = len(
                    [
                        b
                        for b in view.nodes(max_age_s=3)
                        if b.role == "cloud" and not b.load.draining
                    ]
                )
                provisioned = len(await fleet.workers())
                timeline.append(
                    {"t": time.monotonic() - t0, "provisioned": provisioned,
                     "ready": ready, "sessions": agents.active}
                )  # fmt: skip
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(agents.session(p, args.seed + i)) for i, p in enumerate(trace)]
        background = [asyncio.create_task(sample())]
        if planner is not None:
            background.append(asyncio.create_task(planner.run(stop)))
        await asyncio.gather(*tasks)
        run_s = time.monotonic() - t0
        cpu = meter.cores()
        load_after = os.getloadavg()
        stop.set()
        for task in background:
            with contextlib.suppress(Exception):
                await task
        end = time.monotonic()
        decisions = (
            []
            if planner is None
            else [d.model_dump() for d in planner.decisions if d.action != "hold"]
        )
        if planner is not None:
            await planner.stop()
        await asyncio.sleep(2.0)  # the last heartbeats (busy time) arrive
        await nc.close()
    provisioned_s = sum((e if not math.isnan(e) else end) - s for s, e in fleet.intervals.values())
    result = summarize(policy, agents, timeline, provisioned_s, sum(busy.values()),
                       fleet.actions, run_s, initial, decisions, rates, args)  # fmt: skip
    result["cpu_cores"] = cpu
    result["load_average_before"] = [round(v, 2) for v in load_before]
    result["load_average_after"] = [round(v, 2) for v in load_after]
    return result


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(
    policy: str, agents: Agents, timeline: list[dict[str, float]], provisioned_s: float,
    busy_s: float, actions: int, run_s: float, initial: int, decisions: list[dict[str, Any]],
    rates: list[float], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """The policy's figures (see the module docstring)."""
    calls = agents.calls
    ok = [c for c in calls if c.outcome == "ok"]
    met = [c for c in ok if c.ttft_s is not None and c.ttft_s * 1e3 <= args.ttft_ms]
    e2e = [c.e2e_s for c in ok if c.e2e_s is not None]
    ttft = [c.ttft_s for c in ok if c.ttft_s is not None]
    return {
        "label": LABEL,
        "policy": policy,
        "calls": len(calls),
        "slo_attainment": len(met) / len(calls) if calls else None,
        "ttft_p95_s": _pct(ttft, 0.95),
        "call_p95_s": _pct(e2e, 0.95),
        "call_p99_s": _pct(e2e, 0.99),
        "session_p95_s": _pct(agents.sessions_s, 0.95),
        "session_p99_s": _pct(agents.sessions_s, 0.99),
        "worker_hours": provisioned_s / 3600,
        "utilization": busy_s / provisioned_s if provisioned_s else None,
        "lost": sum(c.outcome == "lost" for c in calls),
        "errors": sum(c.outcome == "error" for c in calls),
        "retried": sum(c.retries > 0 for c in calls),
        "scale_actions": actions,
        "initial_replicas": initial,
        "peak_replicas": max((p["provisioned"] for p in timeline), default=initial),
        "run_s": run_s,
        "timeline": timeline,
        "ttft_series": [(c.at_s, c.ttft_s) for c in calls],
        "demand_rps": rates,
        "decisions": decisions,
    }


# -- reporting ------------------------------------------------------------------------------


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The comparison table (worker-hours also as a share of the peak-sized fleet's)."""
    peak = next((r["worker_hours"] for r in results if r["policy"] == "static-peak"), None)
    lines = [
        f"**{LABEL}** fleet, real mesh and planner; TTFT target {args.ttft_ms:g} ms, "
        f"ITL {args.itl_ms:g} ms; seed {args.seed}",
        "",
        "| policy | SLO met | TTFT p95 s | call p95/p99 s | session p95/p99 s | worker-h | "
        "vs peak | util | lost | scale actions | CPU harness/fleet/nats, machine busy | "
        "load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    for r in results:
        share = r["worker_hours"] / peak if peak else None
        lines.append(
            f"| {r['policy']} | {f(r['slo_attainment'], '.1%')} | {f(r['ttft_p95_s'])} | "
            f"{f(r['call_p95_s'])}/{f(r['call_p99_s'])} | {f(r['session_p95_s'])}/"
            f"{f(r['session_p99_s'])} | {r['worker_hours']:.3f} | {f(share, '.0%')} | "
            f"{f(r['utilization'], '.1%')} | {r['lost']} | {r['scale_actions']} | "
            f"{_cpu_cell(r.get('cpu_cores'))} | {_load_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_cell(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "-"
    return (
        f"{cpu['harness']:.2f}/{cpu['fleet']:.2f}/{cpu['nats']:.2f} cores, "
        f"{cpu['machine_busy_share']:.0%}"
    )


def _load_cell(r: dict[str, Any]) -> str:
    if "load_average_before" not in r:
        return "-"
    return f"{r['load_average_before'][0]:.2f} → {r['load_average_after'][0]:.2f}"


def plot(results: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    """Demand, replicas and TTFT over time, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(10, 3 * len(results)), sharex=True, squeeze=False
    )
    for ax, r in zip(axes[:, 0], results, strict=True):
        demand = r["demand_rps"]
        ax.plot(
            [i * 10 for i in range(len(demand))], demand, color="grey", label="demand (calls/s)"
        )
        ax.set_ylabel("calls/s")
        twin = ax.twinx()
        t = [p["t"] for p in r["timeline"]]
        twin.step(
            t, [p["provisioned"] for p in r["timeline"]], color="tab:blue", label="provisioned"
        )
        twin.step(t, [p["ready"] for p in r["timeline"]], color="tab:green", label="ready")
        pts = [(a, s) for a, s in r["ttft_series"] if s is not None]
        if pts:
            scale = (
                max(p["provisioned"] for p in r["timeline"]) / max(s for _, s in pts)
                if r["timeline"]
                else 1
            )
            xs, ys = [a for a, _ in pts], [s * scale for _, s in pts]
            twin.scatter(xs, ys, s=2, color="tab:red", alpha=0.3, label="TTFT (scaled)")
        twin.set_ylabel("replicas")
        ax.set_title(f"{r['policy']} ({LABEL})")
        ax.legend(loc="upper left", fontsize=7)
        twin.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds (one compressed day)")
    fig.suptitle(f"Planner benchmark, {LABEL}: TTFT target {args.ttft_ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--duration-s", type=float, default=1200.0, help="one compressed day")
    p.add_argument("--trough-sessions", type=float, default=60)
    # Sized to this 2-core machine: the whole mesh (fleet, NATS, agents) tops out near
    # 115 calls/s here (docs/benchmarks.md, scale); 1,200 sessions peak at ~52 calls/s,
    # so the fleet, not the harness, sets the latencies. 12,000 needs ~520 calls/s.
    p.add_argument("--peak-sessions", type=float, default=1200)
    p.add_argument("--gap-median-s", type=float, default=20.0)
    p.add_argument("--gap-sigma", type=float, default=0.8)
    p.add_argument(
        "--call-s", type=float, default=2.5, help="a call's mean duration, for the trace"
    )
    p.add_argument("--burst-shape", type=float, default=0.5)
    p.add_argument("--burst-every-s", type=float, default=15.0)
    p.add_argument(
        "--burst-model", choices=["intervals", "windows"], default="intervals",
        help="intervals: Gamma(--burst-shape) gaps between session starts (BurstGPT's "
        "model); windows: the start rate times a Gamma factor per --burst-every-s (harsher)",
    )  # fmt: skip
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--itl-ms", type=float, default=250.0)
    p.add_argument(
        "--ttft-quantile", type=float, default=0.99,
        help="the share of calls capacity is sized to keep within --ttft-ms (the issue's 99%%)",
    )  # fmt: skip
    p.add_argument("--engine-start-s", type=float, default=20.0)
    # Unset: the planner's default, the engine's start time (PlannerConfig).
    p.add_argument("--scale-down-cooldown-s", type=float, default=None)
    p.add_argument("--trend-damping", type=float, default=None, help="unset: the planner's")
    p.add_argument("--utilization-target", type=float, default=0.9)
    p.add_argument("--band-z", type=float, default=None, help="unset: the planner's")
    p.add_argument("--forecaster", default="kalman", choices=["kalman", "holt_winters", "last"])
    p.add_argument("--max-replicas", type=int, default=600)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--out", default="bench-results/planner")
    p.add_argument("--smoke", action="store_true", help="a tiny run to check that it works")
    p.add_argument(
        "--sequential", action="store_true",
        help="one policy after the other (default: side by side, each its own mesh)",
    )  # fmt: skip
    p.add_argument("--host-spec", help=argparse.SUPPRESS)
    p.add_argument("--policy-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.duration_s, args.trough_sessions, args.peak_sessions = 60.0, 4, 40
        args.gap_median_s, args.engine_start_s, args.scale_down_cooldown_s = 3.0, 5.0, 5.0
        args.burst_every_s = 10.0
    return args


def run_side_by_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each policy in its own process, on its own mesh, all at once: every policy sees
    the same machine at the same moment, and a run takes one day instead of four."""
    import subprocess

    out = Path(args.out)
    children = []
    for policy in args.policies:
        spec = {**vars(args), "policies": [policy], "policy_child": None, "host_spec": None}
        children.append(
            (policy, subprocess.Popen(
                [sys.executable, "-m", "bench.planner_bench", "--policy-child", json.dumps(spec)]
            ))
        )  # fmt: skip
    results = []
    for policy, child in children:
        if child.wait() != 0:
            raise SystemExit(f"policy {policy} failed (exit {child.returncode})")
        results.append(json.loads((out / f"{policy}.json").read_text()))
    return results


def _brief(result: dict[str, Any]) -> str:
    series = ("timeline", "ttft_series", "demand_rps", "decisions")
    return json.dumps({k: v for k, v in result.items() if k not in series})


def main() -> None:
    args = parse_args()
    if args.host_spec:
        host_main(json.loads(args.host_spec))
        return
    if args.policy_child:  # one policy of a side-by-side run
        args = argparse.Namespace(**json.loads(args.policy_child))
        trace = make_trace(args)
        result = asyncio.run(run_policy(args.policies[0], args, trace))
        (Path(args.out) / f"{args.policies[0]}.json").write_text(json.dumps(result))
        print(_brief(result), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = make_trace(args)
    print(f"{LABEL}: {len(trace)} sessions over {args.duration_s:.0f} s; capacity "
          f"{capacity(args):.2f} calls/s per replica", flush=True)  # fmt: skip
    if args.sequential or len(args.policies) == 1:
        results = []
        for policy in args.policies:
            print(f"policy {policy} ...", flush=True)
            results.append(asyncio.run(run_policy(policy, args, trace)))
            print(_brief(results[-1]), flush=True)
    else:
        print(f"policies {', '.join(args.policies)}, side by side ...", flush=True)
        results = run_side_by_side(args)
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )
    table = markdown(results, args)
    (out / "results.md").write_text(table)
    plot(results, out / "planner.png", args)
    print(table)


if __name__ == "__main__":
    main()
