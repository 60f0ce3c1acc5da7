"""Scale run (SIMULATED ENGINE): thousands of concurrent agentic sessions through the real mesh.

Everything but the forward pass is real and runs on this machine: an embedded
nats-server, ``--edges`` edge daemons (``tandem edge serve --engine sim``, each its
own process: HTTP, router, cloud route, NATS), a simulated cloud fleet
(``CloudWorker`` + ``SimVllmEngine``, ``--workers-per-host`` workers in each of
``--hosts`` processes, each worker with its own NATS connection and micro service),
and ``--clients`` client processes, each running its share of the sessions on one
event loop with one pooled ``httpx.AsyncClient``. The engines follow the latency
profile calibrated by ``bench/calibrate.py`` (``models/profiles/default.json``).

The agentic session model (seeded; see ``Session``):

- a session works on tasks; a task is 2-6 LLM calls; each call sends the whole
  conversation (system prompt, the task's messages) with ``x-session-id``;
- a share ``--tool-share`` of calls carry 4 tool definitions (the router sends them
  to the cloud), the rest are plain chats (served on the edge);
- ``max_tokens`` is uniform in 16..64; ``--stream-share`` of the calls stream;
- between two calls the agent is in tool or think time: lognormal with median
  ``--gap-median-s`` and sigma ``--gap-sigma`` (mean = median x e^(sigma^2 / 2));
  after each answer a tool result of 40-80 words joins the conversation;
- at the start every session is already part-way through a task (its history
  exists) and its first call comes after the time left of the gap it is in,
  drawn as a steady-state agent's would be (a uniform share of a length-biased
  gap: a session observed at a random moment is more likely inside a long gap),
  so the run starts at the steady call rate, sessions / (mean gap + call time),
  rather than with a thundering herd or a burst of early calls.

Per run it reports: calls/s, end-to-end latency, the mesh-added latency (end to
end minus the engine time the simulated engine reports in ``usage.tandem``: what
HTTP, routing, NATS and the worker add), errors, lost requests (sent but never
answered completely, counted per call by the clients), the edges' own request
counters, RSS per session (edges + clients, and with workers, over an idle
baseline taken before the sessions exist) and CPU per role. ``--sessions`` takes
several levels: each runs on a fresh mesh, and the sweep stops at the first level
that breaks the SLO (P95 mesh-added latency over ``--slo-p95-ms``, or any lost
request, or errors over 0.1%).

    python -m bench.scale_bench --sessions 1000 2000 3000          # stops at saturation
    python -m bench.scale_bench --sessions 12000 16000 --keep-going
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.catalog import DEFAULT_PAIR

if TYPE_CHECKING:
    from tandem.supervisor import Child, Supervisor

LABEL = "SIMULATED ENGINE"
MODEL = DEFAULT_PAIR
WORDS = (
    "plan file test build deploy check error result value list index query table user "
    "config server client cache token route stream batch model answer tool call retry"
).split()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {arg: {"type": "string", "description": f"the {arg}"}},
                "required": [arg],
            },
        },
    }
    for name, description, arg in (
        ("read_file", "Read a file of the repository.", "path"),
        ("run_tests", "Run the test suite and return failures.", "selector"),
        ("search_code", "Search the code base for a pattern.", "pattern"),
        ("write_file", "Replace a file's content.", "path"),
    )
]
SYSTEM = (
    "You are a coding agent. Work step by step, call tools to read, search, edit and "
    "test the repository, and answer briefly when the task is done."
)


# -- the agentic session (client side) ------------------------------------------------------


@dataclass
class CallRecord:
    """One LLM call as the client saw it."""

    start: float  # seconds after the run's start
    e2e_s: float | None  # None: never answered completely (lost)
    status: int  # HTTP status; 0 when no response arrived
    outcome: str  # ok | error | lost
    route: str | None = None
    engine_ms: float | None = None
    stream: bool = False
    ttft_s: float | None = None
    simulated: bool = False
    failure: str | None = None  # the exception type of a lost call


@dataclass
class Session:
    """One agent: its conversation, its randomness, its edge."""

    id: str
    edge_url: str
    rng: random.Random
    gap_median_s: float
    gap_sigma: float
    tool_share: float
    stream_share: float
    messages: list[dict[str, str]] = field(default_factory=list)
    calls_left: int = 0

    def words(self, lo: int, hi: int) -> str:
        """Some task-like words."""
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def new_task(self) -> None:
        """Start a task: a user request, 2-6 calls to finish it."""
        self.messages = [{"role": "user", "content": f"Task: {self.words(15, 40)}"}]
        self.calls_left = self.rng.randint(2, 6)

    def midway(self) -> None:
        """Start part-way through a task, as a session that has been running a while."""
        self.new_task()
        for _ in range(self.rng.randint(0, self.calls_left - 1)):
            self.absorb(self.words(10, 40))

    def gap_s(self) -> float:
        """Tool or think time before the next call."""
        return self.rng.lognormvariate(math.log(self.gap_median_s), self.gap_sigma)

    def time_left_s(self) -> float:
        """The rest of the gap a steady-state session is in when the run starts.

        A random moment falls in a gap with probability proportional to its length;
        for a lognormal gap that length-biased gap is lognormal with mu + sigma^2.
        (A uniform share of a plain gap, as earlier runs drew it, starts calls up to
        E[1/gap] x E[gap] = e^(sigma^2) = 2.7x faster than the steady rate at sigma 1.)
        """
        mu = math.log(self.gap_median_s) + self.gap_sigma**2
        return self.rng.random() * self.rng.lognormvariate(mu, self.gap_sigma)

    def request(self) -> tuple[dict[str, Any], bool]:
        """The next call's body, and whether it streams."""
        if self.calls_left <= 0:
            self.new_task()
        stream = self.rng.random() < self.stream_share
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "system", "content": SYSTEM}, *self.messages],
            "max_tokens": self.rng.randint(16, 64),
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.rng.random() < self.tool_share:
            body["tools"] = TOOLS
        return body, stream

    def absorb(self, answer: str) -> None:
        """The answer and the tool result that follows it join the conversation."""
        self.messages.append({"role": "assistant", "content": answer or "(no text)"})
        self.messages.append({"role": "user", "content": f"Tool result: {self.words(40, 80)}"})
        self.calls_left -= 1


async def one_call(http: Any, session: Session, t0: float) -> tuple[CallRecord, str]:
    """Send one call; the record and the answer text."""
    body, stream = session.request()
    headers = {"x-session-id": session.id}
    url = f"{session.edge_url}/v1/chat/completions"
    start = time.perf_counter()
    record = CallRecord(start=start - t0, e2e_s=None, status=0, outcome="lost", stream=stream)
    text = ""
    try:
        if stream:
            text = await _streamed(http, url, body, headers, record, start)
        else:
            async with http.post(url, json=body, headers=headers) as resp:
                record.status = resp.status
                data = await resp.json()
            if resp.status == 200:
                text = data["choices"][0]["message"]["content"] or ""
                _read_usage(record, data.get("usage"))
                record.outcome = "ok"
            else:
                record.outcome = "error"
        record.e2e_s = time.perf_counter() - start
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a transport failure: the call is lost, counted, never retried
        record.outcome = "lost"
        record.failure = type(exc).__name__
    return record, text


async def _streamed(
    http: Any,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: CallRecord,
    start: float,
) -> str:
    parts: list[str] = []
    done = finished = False
    async with http.post(url, json=body, headers=headers) as resp:
        record.status = resp.status
        if resp.status != 200:
            await resp.read()
            record.outcome = "error"
            return ""
        async for raw in resp.content:  # one line at a time
            if not raw.startswith(b"data: "):
                continue
            payload = raw[6:].decode("utf-8").rstrip("\r\n")
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                record.outcome = "error"
                continue
            if chunk.get("usage"):
                _read_usage(record, chunk["usage"])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - start
                    parts.append(piece)
                finished = finished or choice.get("finish_reason") is not None
    if record.outcome != "error":
        record.outcome = "ok" if done and finished else "lost"
    return "".join(parts)


def _read_usage(record: CallRecord, usage: dict[str, Any] | None) -> None:
    tandem = (usage or {}).get("tandem") or {}
    record.route = tandem.get("route")
    record.engine_ms = tandem.get("simulated_engine_ms")
    record.simulated = bool(tandem.get("simulated"))


async def run_session(
    http: Any,
    session: Session,
    t0: float,
    stop_at: float,
    records: list[CallRecord],
    in_call: set[str],
) -> None:
    """Think, call, absorb the answer; until the run's window closes."""
    await asyncio.sleep(session.time_left_s())
    while time.perf_counter() < stop_at:
        in_call.add(session.id)
        record, text = await one_call(http, session, t0)
        in_call.discard(session.id)
        records.append(record)
        if record.outcome == "ok":
            session.absorb(text)
        await asyncio.sleep(min(session.gap_s(), max(0.0, stop_at - time.perf_counter()) + 0.01))


async def client_main(spec: dict[str, Any]) -> None:
    """One client process: its sessions, one pooled HTTP client, results to a file."""
    import aiohttp

    rng = random.Random(spec["seed"])
    sessions = []
    for i in range(spec["first"], spec["first"] + spec["count"]):
        session = Session(
            id=f"s{i}",
            edge_url=spec["edges"][i % len(spec["edges"])],
            rng=random.Random(rng.getrandbits(64)),
            gap_median_s=spec["gap_median_s"],
            gap_sigma=spec["gap_sigma"],
            tool_share=spec["tool_share"],
            stream_share=spec["stream_share"],
        )
        session.midway()
        sessions.append(session)
    # Idle pooled connections expire well before uvicorn's 5 s keep-alive timeout: otherwise
    # the client may send on a connection the server is closing (a race, not a mesh loss).
    # aiohttp, not httpx: the clients share the machine with the mesh, and aiohttp spends
    # less CPU per call (docs/benchmarks.md has the figures).
    connector = aiohttp.TCPConnector(limit=spec["max_connections"], keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=spec["call_timeout_s"])
    records: list[CallRecord] = []
    in_call: set[str] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.to_thread(Path(spec["ready_file"]).write_text, "ready")
        start_at = await asyncio.to_thread(_wait_for_go, Path(spec["go_file"]))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        stop_at = t0 + spec["duration_s"]
        tasks = [
            asyncio.create_task(run_session(http, s, t0, stop_at, records, in_call))
            for s in sessions
        ]
        # No call starts after stop_at; calls in flight then get drain_s to finish.
        pending: set[asyncio.Task[None]] = set()
        if tasks:  # a client may have no sessions (fewer sessions than clients)
            _, pending = await asyncio.wait(tasks, timeout=spec["duration_s"] + spec["drain_s"])
        cut = len(in_call)  # sessions still waiting on an answer: those calls are lost
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    out = {"records": [asdict(r) for r in records], "cut_in_flight": cut}
    await asyncio.to_thread(Path(spec["result_file"]).write_text, json.dumps(out))


def _wait_for_go(go: Path) -> float:
    """Block until the orchestrator names the start time (after its memory baseline)."""
    while not go.exists():
        time.sleep(0.05)
    return float(go.read_text())


# -- the mesh (orchestrator side) -------------------------------------------------------------


def host_workers_main(spec: dict[str, Any]) -> None:
    """One fleet host process: several simulated cloud workers, each its own NATS client."""
    from cloud.settings import CloudSettings
    from cloud.sim_engine import SimVllmEngine
    from cloud.worker import CloudWorker
    from mesh.runtime import freeze_startup_objects

    async def run() -> None:
        workers = []
        vocab = None  # one vocabulary for every worker of this process
        for worker_id in spec["worker_ids"]:
            settings = CloudSettings.model_validate(
                {
                    "nats_url": spec["nats_url"],
                    "worker_id": worker_id,
                    "engine": "sim",
                    "kv_cache_gb": spec["kv_cache_gb"],
                    "stream_interval": spec["stream_interval"],
                }
            )
            engine = SimVllmEngine(settings, vocab=vocab)
            await engine.start()
            vocab = engine.vocab
            worker = CloudWorker(settings, engine)
            await worker.start()
            workers.append((worker, engine))
        freeze_startup_objects()  # as a worker process does (cloud/service.py)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for worker, engine in workers:
            await worker.drain()
            engine.shutdown()

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    _fast_loop()
    asyncio.run(run())


def _fast_loop() -> None:
    """uvloop when installed (as uvicorn uses it for the edges)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass
class Proc:
    """A child process of the run and its role."""

    role: str
    child: Child

    def rss_bytes(self) -> int:
        """Resident memory now (0 once it has exited)."""
        try:
            for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_s(self) -> float:
        """User + system CPU seconds so far."""
        return cpu_seconds(self.child.pid)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 once it has exited)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(
    supervisor: Supervisor,
    role: str,
    argv: list[str],
    env: dict[str, str],
    log_dir: Path,
    name: str,
) -> Proc:
    child = supervisor.start(name, argv, env=env, log_path=log_dir / f"{name}.log", grace_s=10)
    return Proc(role, child)


def _wait(what: str, ready: Any, procs: list[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        for proc in procs:
            if not proc.child.alive:
                raise RuntimeError(f"{proc.role} exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _edges_ready(urls: list[str]) -> bool:
    import httpx

    try:
        return all(httpx.get(f"{u}/health", timeout=2).json()["mesh"] == "connected" for u in urls)
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def _edge_request_counts(urls: list[str]) -> dict[str, float] | str:
    """Each edge's own ``tandem_edge_requests_total`` by status, summed over edges."""
    import httpx

    totals: dict[str, float] = {}
    for url in urls:
        try:  # a saturated edge may still be working through abandoned requests
            text = httpx.get(f"{url}/metrics", timeout=120).text
        except httpx.HTTPError as exc:
            return f"unavailable: {type(exc).__name__} from {url}"
        for line in text.splitlines():
            if line.startswith("tandem_edge_requests_total{"):
                labels, _, value = line.rpartition(" ")
                status = labels.split('status="')[1].split('"')[0]
                totals[status] = totals.get(status, 0.0) + float(value)
    return totals


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def run_level(args: argparse.Namespace, sessions: int) -> dict[str, Any]:
    """One run on a fresh mesh with ``sessions`` concurrent sessions."""
    from tandem.local import local_nats
    from tandem.supervisor import Supervisor

    work = Path(tempfile.mkdtemp(prefix="tandem-scale-"))  # every process's log, kept
    print(f"  logs: {work}", flush=True)
    # Leaving the block stops every process in reverse start order, then NATS.
    with Supervisor() as supervisor, local_nats(supervisor, store_dir=work / "nats") as nats:
        return _run_on_mesh(args, sessions, nats, supervisor, work)


def _run_on_mesh(
    args: argparse.Namespace, sessions: int, nats: Any, supervisor: Supervisor, work: Path
) -> dict[str, Any]:
    from mesh import subjects
    from mesh.server import free_port
    from tandem.local import tandem_argv

    procs: list[Proc] = []
    me = [sys.executable, "-m", "bench.scale_bench"]
    worker_ids = [f"sim-w{h}-{i}" for h in range(args.hosts) for i in range(args.workers_per_host)]
    for h in range(args.hosts):
        spec = {
            "nats_url": nats.url,
            "worker_ids": worker_ids[h * args.workers_per_host : (h + 1) * args.workers_per_host],
            "kv_cache_gb": args.worker_kv_gb,
            "stream_interval": args.stream_interval,
        }
        argv = [*me, "--host-workers", json.dumps(spec)]
        procs.append(_spawn(supervisor, "cloud", argv, {}, work, f"host{h}"))
    urls = []
    for e in range(args.edges):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        env = {
            "TANDEM_EDGE_ENGINE": "sim",
            "TANDEM_EDGE_PORT": str(port),
            "TANDEM_EDGE_NATS_URL": nats.url,
            "TANDEM_EDGE_NODE_ID": f"sim-edge-{e}",
            "TANDEM_EDGE_SLOTS": str(args.edge_slots),
            "TANDEM_EDGE_MAX_QUEUE": "100000",
            "TANDEM_EDGE_SESSION_CACHE_MB": str(args.edge_session_cache_mb),
            "TANDEM_EDGE_LOG_LEVEL": "warning",
        }
        argv = tandem_argv("edge", "serve")
        procs.append(_spawn(supervisor, "edge", argv, env, work, f"edge{e}"))
    _wait(
        "the simulated workers",
        lambda: all(nats.subscribers(subjects.worker(w, "generate")) for w in worker_ids),
        procs,
        120,
    )
    _wait("the edges", lambda: _edges_ready(urls), procs, 120)
    time.sleep(2.5)  # the edges see every worker's heartbeat
    go_file = work / "go"
    specs = []
    per_client = math.ceil(sessions / args.clients)
    for c in range(args.clients):
        first = c * per_client
        spec = {
            "seed": args.seed * 1000 + c,
            "first": first,
            "count": max(0, min(per_client, sessions - first)),
            "edges": urls,
            "gap_median_s": args.gap_median_s,
            "gap_sigma": args.gap_sigma,
            "tool_share": args.tool_share,
            "stream_share": args.stream_share,
            "duration_s": args.duration_s,
            "drain_s": args.drain_s,
            "call_timeout_s": args.drain_s + args.duration_s,
            "max_connections": args.max_connections,
            "ready_file": str(work / f"ready{c}"),
            "go_file": str(go_file),
            "result_file": str(work / f"result{c}.json"),
        }
        specs.append(spec)
        argv = [*me, "--client", json.dumps(spec)]
        procs.append(_spawn(supervisor, "client", argv, {}, work, f"client{c}"))
    _wait("the clients", lambda: all(Path(s["ready_file"]).exists() for s in specs), procs, 120)
    time.sleep(1.0)
    baseline = _rss_by_role(procs)
    cpu_before = {id(p): p.cpu_s() for p in procs}
    machine_before = _machine_busy()
    start_at = time.time() + 0.5
    (work / "go.tmp").write_text(repr(start_at))
    (work / "go.tmp").replace(go_file)  # atomic: a client never reads half a number
    peak = dict(baseline)
    samples = []
    cpu_mark, machine_mark = dict(cpu_before), machine_before
    clients = [p for p in procs if p.role == "client"]
    while any(p.child.alive for p in clients):
        time.sleep(2.0)
        now = _rss_by_role(procs)
        samples.append(now)
        if time.time() < start_at + args.duration_s:
            peak = {role: max(peak.get(role, 0), rss) for role, rss in now.items()}
            cpu_mark = {id(p): p.cpu_s() for p in procs}
            machine_mark = _machine_busy()
    failed = [p for p in clients if p.child.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} client process(es) failed; see {work}")
    results = [json.loads(Path(s["result_file"]).read_text()) for s in specs]
    edge_counts = _edge_request_counts(urls)
    window_s = args.duration_s
    cpu: dict[str, float] = {}
    for p in procs:
        cpu[p.role] = cpu.get(p.role, 0.0) + (cpu_mark[id(p)] - cpu_before[id(p)]) / window_s
    busy = (machine_mark[0] - machine_before[0]) / max(1.0, machine_mark[1] - machine_before[1])
    return summarize(
        args,
        sessions,
        results,
        edge_counts,
        baseline=baseline,
        peak=peak,
        cpu_cores=cpu,
        machine_busy=busy,
        workers=len(worker_ids),
    )


def _rss_by_role(procs: list[Proc]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in procs:
        out[p.role] = out.get(p.role, 0) + p.rss_bytes()
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(
    args: argparse.Namespace,
    sessions: int,
    results: list[dict[str, Any]],
    edge_counts: dict[str, float] | str,
    *,
    baseline: dict[str, int],
    peak: dict[str, int],
    cpu_cores: dict[str, float],
    machine_busy: float,
    workers: int,
) -> dict[str, Any]:
    """The level's numbers: latency after warm-up, every call's outcome, memory, CPU."""
    records = [r for res in results for r in res["records"]]
    cut = sum(res["cut_in_flight"] for res in results)
    measured = [r for r in records if r["start"] >= args.warmup_s]
    ok = [r for r in measured if r["outcome"] == "ok"]
    e2e = [r["e2e_s"] * 1000 for r in ok]
    mesh = [r["e2e_s"] * 1000 - r["engine_ms"] for r in ok if r["engine_ms"] is not None]
    engine = [r["engine_ms"] for r in ok if r["engine_ms"] is not None]
    routes: dict[str, int] = {}
    for r in ok:
        routes[str(r["route"])] = routes.get(str(r["route"]), 0) + 1
    outcomes = {k: sum(1 for r in records if r["outcome"] == k) for k in ("ok", "error", "lost")}
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r["status"]) if r["status"] else f"no response ({r['failure']})"
        statuses[key] = statuses.get(key, 0) + 1
    mem = {role: peak.get(role, 0) - baseline.get(role, 0) for role in baseline}
    edge_client = mem.get("edge", 0) + mem.get("client", 0)
    window = args.duration_s - args.warmup_s
    return {
        "label": LABEL,
        "sessions": sessions,
        "edges": args.edges,
        "cloud_workers": workers,
        "clients": args.clients,
        "calls": len(records),
        "calls_per_s": round(len(measured) / window, 1),
        "outcomes": outcomes,
        "lost": outcomes["lost"] + cut,
        "lost_cut_at_drain": cut,
        "error_rate": round(outcomes["error"] / max(1, len(records)), 5),
        "http_statuses": statuses,
        "edge_counted_requests": edge_counts,
        "all_simulated": all(r["simulated"] for r in ok),
        "routes": routes,
        "e2e_ms": _dist(e2e),
        "engine_ms": _dist(engine),
        "mesh_added_ms": _dist(mesh),
        "rss_baseline_mb": {k: round(v / 2**20, 1) for k, v in baseline.items()},
        "rss_delta_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
        "rss_per_session_kb_edge_client": round(edge_client / sessions / 1024, 2),
        "rss_per_session_kb_all": round(sum(mem.values()) / sessions / 1024, 2),
        "cpu_cores_by_role": {k: round(v, 2) for k, v in cpu_cores.items()},
        "machine_busy": round(machine_busy, 3),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _dist(values: list[float]) -> dict[str, float | None]:
    r = lambda v: None if v is None else round(v, 2)  # noqa: E731
    return {
        "n": len(values),
        "p50": r(_pct(values, 50)),
        "p95": r(_pct(values, 95)),
        "p99": r(_pct(values, 99)),
        "mean": r(statistics.mean(values)) if values else None,
    }


def breaks_slo(level: dict[str, Any], slo_p95_ms: float) -> str | None:
    """Why a level is past saturation, or None while it holds."""
    p95 = level["mesh_added_ms"]["p95"]
    if level["lost"]:
        return f"{level['lost']} lost requests"
    if level["error_rate"] > 0.001:
        return f"error rate {level['error_rate']:.2%}"
    if p95 is None or p95 > slo_p95_ms:
        return f"P95 mesh-added {p95} ms > {slo_p95_ms} ms"
    return None


def markdown(levels: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The sweep as a table, labelled SIMULATED ENGINE."""
    lines = [
        f"**{LABEL}** - scale run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| sessions | calls/s | mesh-added P50 / P95 / P99 ms | e2e P95 ms | engine P95 ms "
        "| errors | lost | RSS/session KB (edge+client / all) | CPU cores (edge, cloud, client) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        m, cpu = lv["mesh_added_ms"], lv["cpu_cores_by_role"]
        lines.append(
            f"| {lv['sessions']} | {lv['calls_per_s']} | {m['p50']} / {m['p95']} / {m['p99']} "
            f"| {lv['e2e_ms']['p95']} | {lv['engine_ms']['p95']} | {lv['outcomes']['error']} "
            f"| {lv['lost']} | {lv['rss_per_session_kb_edge_client']} / "
            f"{lv['rss_per_session_kb_all']} | {cpu.get('edge')}, {cpu.get('cloud')}, "
            f"{cpu.get('client')} | {lv.get('verdict') or 'holds'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[12000])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--drain-s", type=float, default=60.0)
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--workers-per-host", type=int, default=60)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--edge-slots", type=int, default=64)
    parser.add_argument("--edge-session-cache-mb", type=int, default=65536)
    parser.add_argument("--worker-kv-gb", type=float, default=64.0)
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the workers' tokens per stream message after the first (vLLM's option)",
    )
    parser.add_argument("--gap-median-s", type=float, default=60.0)
    parser.add_argument("--gap-sigma", type=float, default=1.0)
    parser.add_argument("--tool-share", type=float, default=0.9)
    parser.add_argument("--stream-share", type=float, default=0.3)
    parser.add_argument("--max-connections", type=int, default=4096)
    parser.add_argument("--slo-p95-ms", type=float, default=250.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep-going", action="store_true", help="run every level, even past saturation"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale"))
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--host-workers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _fast_loop()
        asyncio.run(client_main(json.loads(args.client)))
        return
    if args.host_workers:
        host_workers_main(json.loads(args.host_workers))
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    args.out.mkdir(parents=True, exist_ok=True)
    levels = []
    for sessions in args.sessions:
        print(f"[{LABEL}] {sessions} sessions ...", flush=True)
        level = run_level(args, sessions)
        level["verdict"] = breaks_slo(level, args.slo_p95_ms)
        levels.append(level)
        print(json.dumps(level, indent=1), flush=True)
        if level["verdict"]:
            print(f"saturated at {sessions} sessions: {level['verdict']}", flush=True)
            if not args.keep_going:
                break
    report = {"label": LABEL, "command": " ".join(sys.argv), "args": vars(args), "levels": levels}
    (args.out / "scale.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(levels, args)
    (args.out / "scale.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
