"""Drive sessions through an edge in every mode, one mode after another, and record them.

Modes differ only in how each LLM call is sent, never in what is sent:

- ``hybrid``: no route asked for; the edge's policy decides.
- ``cloud``: ``x-tandem-route: cloud`` on every call (cloud-only).
- ``edge``: ``x-tandem-route: edge`` on every call (edge-only).
- ``naive``: cloud-only with one call in flight at a time across all sessions
  (naive sequential processing, no batching).
- ``speculative`` (optional): ``x-tandem-route: speculative`` on every call.

Calls go through the official ``openai`` client, streamed, at temperature 0
by default. Each mode's conversations start with a system line carrying a
short tag of the mode, so no mode is served from prefix caches another mode
warmed. After a mode's measured window (and its engine-time reading), every
call it served off the cloud is sent again, unchanged, on the cloud route:
agreement is the share answered identically.
Then, unless the plan says otherwise, the mode plays its BFCL sessions once more
with enforced tool choice: every step whose ground truth is a call is sent with
``tool_choice: "required"`` (constrained decoding on the edge and the cloud), the
answers in words free as before. That pass is quality only: it runs after the
mode's engine-time reading, so the mode's latency, throughput and cost are free
decoding's, and its validity and accuracy sit beside free decoding's in the same run.
Arrival is a closed loop (``concurrency`` sessions in flight) or Poisson
(sessions arrive at ``rate_per_s``, at most ``concurrency`` in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import openai

from tandem.bench.cost import CostModel
from tandem.bench.errors import BenchConfigError
from tandem.bench.metrics import (
    CallRecord,
    EngineSeconds,
    SessionRecord,
    agreement,
    summarize,
)
from tandem.bench.schema import ModeResult
from tandem.bench.workloads import Message, Reply, Session, Tool, ToolCallOut

if TYPE_CHECKING:
    from mesh.connection import MeshCredentials

logger = logging.getLogger(__name__)

# The default model's own default system line (its template's), kept so that the
# tag is the only change a mode makes to a conversation.
_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_EDGE_BUSY_METRIC = "tandem_edge_engine_busy_seconds_total"
_HEARTBEAT_SETTLE_S = 1.5  # one heartbeat interval and a margin: the last beat covers the mode
ENFORCED_TOOL_CHOICE = "required"  # what the enforced pass sends on steps that expect a call


@dataclass(frozen=True)
class Mode:
    """How a mode sends calls: the route it asks for and whether calls go one at a time."""

    name: str
    route: str | None
    one_at_a_time: bool = False


MODES = {
    "hybrid": Mode("hybrid", None),
    "cloud": Mode("cloud", "cloud"),
    "edge": Mode("edge", "edge"),
    "naive": Mode("naive", "cloud", one_at_a_time=True),
    "speculative": Mode("speculative", "speculative"),
}


class CallFailedError(Exception):
    """An LLM call failed (HTTP error, refused connection, a stream without usage)."""


class Progress(Protocol):
    """Where the runner reports what it is doing (a rich display in the CLI)."""

    def start_mode(self, label: str, sessions: int) -> None: ...

    def session_done(self, label: str, failed: bool) -> None: ...


class NoProgress:
    """Reports nothing."""

    def start_mode(self, label: str, sessions: int) -> None:
        """Ignore."""

    def session_done(self, label: str, failed: bool) -> None:
        """Ignore."""


@dataclass(frozen=True)
class Target:
    """The edge to drive and how to ask it."""

    base_url: str  # HTTP root, e.g. http://127.0.0.1:8080
    model: str
    api_key: str = "unused"
    nats_url: str | None = None  # to hear cloud workers' engine time
    # Who to hear them as on a secured mesh (an operator: it may read heartbeats; the CLI
    # resolves it as tandem status does, tandem.commands.common.operator_credentials).
    nats_credentials: MeshCredentials | None = None
    max_tokens: int = 48
    temperature: float = 0.0
    timeout_s: float = 600.0


def tagged(messages: Sequence[Message], tag: str) -> list[Message]:
    """The conversation with the mode's tag at the start of its system line."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"[{tag}] {messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": f"[{tag}] {_DEFAULT_SYSTEM}"}, *messages]


class Caller:
    """Sends one mode's calls through the official openai client and records them.

    With ``tool_choice`` set (the enforced pass), steps that expect a call send it."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        target: Target,
        mode: Mode,
        tag: str,
        tool_choice: str | None = None,
    ) -> None:
        self._client, self._target, self._mode, self._tag = client, target, mode, tag
        self._tool_choice = tool_choice
        self._one_at_a_time = asyncio.Semaphore(1) if mode.one_at_a_time else None
        # Requests served off the cloud, with their answers: replayed on the cloud later.
        self.off_cloud: list[tuple[list[Message], list[Tool] | None, str]] = []
        # Sessions with a step that expected a call: the ones an enforced pass plays again.
        self.expecting_calls: set[str] = set()

    async def call(
        self,
        record: SessionRecord,
        session_id: str,
        messages: list[Message],
        tools: list[Tool] | None,
        expects_call: bool = False,
    ) -> Reply:
        """One streamed chat completion, appended to ``record``."""
        sent = tagged(messages, self._tag)
        headers = {"x-session-id": session_id}
        if self._mode.route is not None:
            headers["x-tandem-route"] = self._mode.route
        if expects_call:
            self.expecting_calls.add(record.key)
        tool_choice = self._tool_choice if expects_call else None
        started = time.perf_counter()
        gate = self._one_at_a_time or contextlib.nullcontext()
        async with gate:
            reply, call = await self._stream(sent, tools, headers, started, tool_choice)
        record.calls.append(CallRecord(session_key=record.key, tool_choice=tool_choice, **call))
        if call["route"] != "cloud" and self._tool_choice is None:
            self.off_cloud.append((sent, tools, _answer(reply)))
        return reply

    async def replay_on_cloud(self, concurrency: int) -> list[tuple[str, str]]:
        """(answer, cloud's answer) for every off-cloud request the cloud answered again."""
        gate = asyncio.Semaphore(concurrency)
        headers = {"x-tandem-route": "cloud"}

        async def one(
            sent: list[Message], tools: list[Tool] | None, answer: str
        ) -> tuple[str, str] | None:
            async with gate:
                try:
                    reply, call = await self._stream(sent, tools, headers, time.perf_counter())
                except CallFailedError:
                    return None
            # An answer from a fallback is not the cloud's: it is not compared.
            return (answer, _answer(reply)) if call["route"] == "cloud" else None

        pairs = await asyncio.gather(*(one(*request) for request in self.off_cloud))
        return [p for p in pairs if p is not None]

    async def _stream(
        self,
        messages: list[Message],
        tools: list[Tool] | None,
        headers: dict[str, str],
        started: float,
        tool_choice: str | None = None,
    ) -> tuple[Reply, dict[str, Any]]:
        first: float | None = None
        content: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage: Any = None
        finish: str | None = None
        try:
            # Messages and tools are plain dicts; openai's TypedDicts accept them at run time.
            stream = await self._client.chat.completions.create(  # type: ignore[call-overload]
                model=self._target.model,
                messages=messages,
                max_tokens=self._target.max_tokens,
                temperature=self._target.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
                tools=tools if tools else openai.omit,
                tool_choice=tool_choice if tool_choice else openai.omit,
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                finish = chunk.choices[0].finish_reason or finish
                if first is None and (delta.content or delta.tool_calls):
                    first = time.perf_counter()
                if delta.content:
                    content.append(delta.content)
                for tc in delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    if tc.function is not None:
                        entry["name"] += tc.function.name or ""
                        entry["arguments"] += tc.function.arguments or ""
        except openai.APIError as exc:
            raise CallFailedError(_describe(exc)) from exc
        ended = time.perf_counter()
        if usage is None:
            raise CallFailedError("the stream ended without a usage chunk")
        tandem = (usage.model_extra or {}).get("tandem") or {}
        speculative = tandem.get("speculative") or {}
        details = usage.prompt_tokens_details
        n_out = usage.completion_tokens
        reply = Reply(
            "".join(content),
            tuple(ToolCallOut(c["name"], c["arguments"]) for _, c in sorted(calls.items())),
        )
        return reply, {
            "latency_s": ended - started,
            "ttft_s": None if first is None else first - started,
            "tpot_s": None if first is None or n_out < 2 else (ended - first) / (n_out - 1),
            "route": str(tandem.get("route", "unknown")),
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": (details.cached_tokens or 0) if details else 0,
            "completion_tokens": n_out,
            "drafted": int(speculative.get("drafted", 0)),
            "accepted": int(speculative.get("accepted", 0)),
            "finish_reason": finish,
        }


def _answer(reply: Reply) -> str:
    """The reply as one comparable string: text and calls."""
    return json.dumps([reply.content, [[c.name, c.arguments] for c in reply.tool_calls]])


def _describe(exc: openai.APIError) -> str:
    """One line for an API failure: status and the server's message."""
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}: {exc.message}" if status else f"{type(exc).__name__}: {exc.message}"


class EngineMeter:
    """Reads each tier's cumulative engine-busy seconds: the edge's /metrics, cloud heartbeats."""

    def __init__(self, target: Target, http: httpx.AsyncClient) -> None:
        self._target, self._http = target, http
        self._nc: Any = None
        self._fleet: Any = None

    async def start(self) -> None:
        """Listen to the mesh's heartbeats, if a NATS URL is known and answers."""
        if self._target.nats_url is None:
            return
        from mesh.connection import connect
        from mesh.errors import MeshError
        from mesh.heartbeat import FleetView

        try:
            # mesh.connection bounds the first connect: plain nats-py retries a refused
            # identity forever, so an anonymous meter hung on a secured mesh.
            self._nc = await connect(
                self._target.nats_url,
                name="tandem-bench",
                credentials=self._target.nats_credentials,
                connect_timeout=3,
            )
        except MeshError as exc:  # no mesh there, or it refused us ('Authorization Violation')
            logger.warning("%s: cloud engine time unknown", exc)
            return
        self._fleet = FleetView(self._nc)
        await self._fleet.start()
        await self.settle()  # hear every worker once before the first reading

    async def close(self) -> None:
        """Stop listening."""
        if self._nc is not None:
            await self._fleet.stop()
            await self._nc.close()

    async def settle(self) -> None:
        """Wait for a heartbeat sent after the work just done."""
        if self._fleet is not None:
            await asyncio.sleep(_HEARTBEAT_SETTLE_S)

    async def read(self) -> tuple[float | None, dict[str, float | None] | None]:
        """Edge busy seconds, and each cloud worker's (None where unknown)."""
        return await self._edge_busy_s(), self._cloud_busy_s()

    async def _edge_busy_s(self) -> float | None:
        headers = {"authorization": f"Bearer {self._target.api_key}"}
        try:
            resp = await self._http.get(f"{self._target.base_url}/metrics", headers=headers)
        except httpx.HTTPError:
            return None
        for line in resp.text.splitlines():
            if line.startswith(_EDGE_BUSY_METRIC + " "):
                return float(line.rpartition(" ")[2])
        return None

    def _cloud_busy_s(self) -> dict[str, float | None] | None:
        if self._fleet is None:
            return None
        return {
            beat.node_id: getattr(beat.load, "engine_busy_s", None)
            for beat in self._fleet.nodes(max_age_s=5.0)
            if beat.role == "cloud"
        }


def engine_seconds(
    before: tuple[float | None, Mapping[str, float | None] | None],
    after: tuple[float | None, Mapping[str, float | None] | None],
) -> EngineSeconds:
    """Busy seconds spent between two readings; None where a tier's time is unknown.

    A worker first heard in the second reading makes the cloud's time unknown: its
    counter started before the mode, so its share of the mode cannot be told.
    """
    edge = None if before[0] is None or after[0] is None else after[0] - before[0]
    cloud: float | None = None
    if before[1] is not None and after[1] is not None:
        if after[1].keys() - before[1].keys():
            return EngineSeconds(edge=edge, cloud=None)
        total = 0.0
        for node in before[1].keys() & after[1].keys():
            was, now = before[1][node], after[1][node]
            if was is None or now is None:  # a worker that does not report engine time
                return EngineSeconds(edge=edge, cloud=None)
            total += now - was
        cloud = total
    return EngineSeconds(edge=edge, cloud=cloud)


async def _drive(
    sessions: Sequence[Session],
    play: Callable[[Session], Awaitable[SessionRecord]],
    concurrency: int,
    arrival: str,
    rate_per_s: float | None,
    duration_s: float | None,
    rng: random.Random,
) -> list[SessionRecord]:
    """Start sessions by the arrival process, at most ``concurrency`` at once."""
    loop = asyncio.get_running_loop()
    free = asyncio.Semaphore(concurrency)
    start = next_at = loop.time()
    tasks: list[asyncio.Task[SessionRecord]] = []

    async def run(session: Session) -> SessionRecord:
        try:
            return await play(session)
        finally:
            free.release()

    for session in sessions:
        if arrival == "poisson":
            assert rate_per_s is not None
            next_at += rng.expovariate(rate_per_s)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await free.acquire()
        if duration_s is not None and loop.time() - start >= duration_s:
            free.release()
            break
        tasks.append(asyncio.create_task(run(session)))
    return list(await asyncio.gather(*tasks))


@dataclass(frozen=True)
class RunPlan:
    """What to run: modes, concurrency levels, arrival."""

    modes: list[str] = field(default_factory=lambda: ["hybrid", "cloud", "edge", "naive"])
    concurrency: list[int] = field(default_factory=lambda: [4])
    arrival: str = "closed"
    rate_per_s: float | None = None
    duration_s: float | None = None
    seed: int = 0
    enforce_tool_choice: bool = True  # each mode's BFCL sessions again, tool_choice required

    def check(self) -> None:
        """Raise BenchConfigError on options that cannot work."""
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise BenchConfigError(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
        if not self.modes or not self.concurrency or min(self.concurrency) < 1:
            raise BenchConfigError("give at least one mode and concurrency levels >= 1")
        if self.arrival not in ("closed", "poisson"):
            raise BenchConfigError("arrival must be 'closed' or 'poisson'")
        if self.arrival == "poisson" and not (self.rate_per_s and self.rate_per_s > 0):
            raise BenchConfigError("poisson arrival needs --rate > 0 (sessions per second)")


@dataclass(frozen=True)
class _Played:
    """What one mode at one concurrency did: its window, and its enforced pass if any."""

    mode: Mode
    concurrency: int
    records: list[SessionRecord]
    wall_s: float
    engine: EngineSeconds
    agreed: tuple[int, float | None]
    enforced: list[SessionRecord] | None


async def run_modes(
    target: Target,
    sessions: Sequence[Session],
    plan: RunPlan,
    cost: CostModel,
    progress: Progress | None = None,
) -> tuple[list[ModeResult], dict[str, list[float]]]:
    """Every mode at every concurrency on the same sessions; results and, per mode at the
    highest concurrency, its turn latencies in ms (for the CDF plot)."""
    plan.check()
    progress = progress or NoProgress()
    played: list[_Played] = []
    async with (
        openai.AsyncOpenAI(
            base_url=f"{target.base_url}/v1",
            api_key=target.api_key,
            max_retries=0,
            timeout=target.timeout_s,
        ) as client,
        httpx.AsyncClient(timeout=10) as http,
    ):
        meter = EngineMeter(target, http)
        await meter.start()
        try:
            for concurrency in plan.concurrency:
                for name in plan.modes:
                    run = _ModeRun(client, target, MODES[name], concurrency, plan, progress)
                    played.append(await run.play(sessions, meter))
        finally:
            await meter.close()
    results = [
        summarize(
            p.mode.name, p.concurrency, p.records, p.wall_s, p.engine, cost, p.agreed, p.enforced
        )
        for p in played
    ]
    top = max(plan.concurrency)
    curves = {
        p.mode.name: [c.latency_s * 1000 for s in p.records for c in s.calls]
        for p in played
        if p.concurrency == top
    }
    return results, curves


@dataclass(frozen=True)
class _ModeRun:
    """One mode at one concurrency: the measured window, the cloud replay, the enforced pass."""

    client: openai.AsyncOpenAI
    target: Target
    mode: Mode
    concurrency: int
    plan: RunPlan
    progress: Progress

    async def play(self, sessions: Sequence[Session], meter: EngineMeter) -> _Played:
        """Play the window between two engine readings, then what is measured after it."""
        label = f"{self.mode.name} c={self.concurrency}"
        # A tag per mode and concurrency: no mode is served from prefix caches another warmed.
        tag = hashlib.sha256(f"{self.plan.seed}:{label}".encode()).hexdigest()[:8]
        caller = Caller(self.client, self.target, self.mode, tag)
        before = await meter.read()
        started = time.perf_counter()
        records = await self._drive(sessions, caller, tag, label, window=True)
        wall = time.perf_counter() - started
        await meter.settle()
        used = engine_seconds(before, await meter.read())
        pairs = await caller.replay_on_cloud(self.concurrency)
        enforced = None
        if self.plan.enforce_tool_choice and caller.expecting_calls:
            # The sessions of the window that expected calls: both decodings are judged
            # on the same scenarios.
            # They keep the window's tag: the pass is not timed, and the prefix its
            # steps share with the window's need not be evaluated again.
            again = [s for s in sessions if s.key in caller.expecting_calls]
            enforcing = Caller(self.client, self.target, self.mode, tag, ENFORCED_TOOL_CHOICE)
            label = f"{label} tool_choice={ENFORCED_TOOL_CHOICE}"
            enforced = await self._drive(again, enforcing, tag, label, window=False)
        if caller.off_cloud or enforced:  # the next mode's first reading must include them
            await meter.settle()
        return _Played(self.mode, self.concurrency, records, wall, used, agreement(pairs), enforced)

    async def _drive(
        self, sessions: Sequence[Session], caller: Caller, tag: str, label: str, window: bool
    ) -> list[SessionRecord]:
        """The window follows the plan's arrival and duration; the enforced pass, which is
        not timed, plays all its sessions in a closed loop."""
        self.progress.start_mode(label, len(sessions))
        plan = self.plan
        return await _drive(
            sessions,
            functools.partial(_play, caller=caller, tag=tag, progress=self.progress, label=label),
            self.concurrency,
            plan.arrival if window else "closed",
            plan.rate_per_s,
            plan.duration_s if window else None,
            random.Random(plan.seed),
        )


async def _play(
    session: Session, caller: Caller, tag: str, progress: Progress, label: str
) -> SessionRecord:
    """Play one session; a failed call ends it and is recorded."""
    record = SessionRecord(key=session.key, workload=session.workload, latency_s=0.0)
    session_id = f"{tag}-{session.key}"

    async def call(
        messages: list[Message], tools: list[Tool] | None, expects_call: bool = False
    ) -> Reply:
        return await caller.call(record, session_id, messages, tools, expects_call)

    started = time.perf_counter()
    try:
        outcome = await session.play(call)
        record.checks = outcome.checks
    except CallFailedError as exc:
        record.error = str(exc)
    record.latency_s = time.perf_counter() - started
    progress.session_done(label, failed=record.error is not None)
    return record
