"""A cloud worker that stalls mid-stream (SIGSTOP) is failed over, and not asked again.

Real processes on a real nats-server: two cloud workers and an edge, all with the
SIMULATED engine (the fault is in the mesh, not the forward pass). A stopped worker
keeps its NATS subscriptions, so the model's queue group may hand the failover straight
back to it; bench/fault_bench.py found 25 of 80 streams lost that way under SIGSTOP on
real vLLM workers. The edge now asks the other workers by their own subjects first.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess, WorkerProcess, wait_heard

pytestmark = pytest.mark.timeout(180)

MODEL = DEFAULT_PAIR
CLOUD = {"x-tandem-route": "cloud"}
STALL_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def workers(nats_server: EmbeddedNats) -> Iterator[dict[str, WorkerProcess]]:
    procs = {wid: WorkerProcess(nats_server, wid, engine="sim") for wid in ("stall-a", "stall-b")}
    for proc in procs.values():
        proc.start()
    try:
        for proc in procs.values():
            proc.wait_ready(timeout_s=60)
        yield procs
    finally:
        for proc in procs.values():
            if proc.child is not None:
                os.killpg(proc.child.pid, signal.SIGCONT)  # never leave one stopped
            proc.stop()


@pytest.fixture(scope="module")
def edge(nats_server: EmbeddedNats, workers: dict[str, WorkerProcess]) -> Iterator[EdgeProcess]:
    with EdgeProcess(
        engine="sim", nats_url=nats_server.url, cloud_stall_timeout_s=STALL_TIMEOUT_S
    ) as proc:
        wait_heard(proc)
        yield proc


def _worker_of(usage: Any) -> str:
    return str(dict(usage.model_extra or {})["tandem"]["worker_id"])


def _stream_with_fault(
    client: Any, content: str, headers: dict[str, str], fault: Callable[[], None]
) -> tuple[str | None, Any, bool]:
    """A 60-token cloud stream, ``fault()`` run once after its fifth chunk (the role, then
    tokens): its finish reason, usage, and whether the fault ran before it ended."""
    chunks, usage, finish, injected = 0, None, None, False
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}],
        max_tokens=60, stream=True, stream_options={"include_usage": True},
        extra_headers=headers,
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
        if not injected and chunks >= 5:
            fault()
            injected = True
    return finish, usage, injected


def test_a_stopped_worker_is_failed_over_and_not_asked_again(
    edge: EdgeProcess, workers: dict[str, WorkerProcess]
) -> None:
    """Four rounds, each stalling the worker that serves the stream for 3x the stall
    timeout: every answer completes whole (all its tokens, once) on the other worker.
    Before the fix, each round had even odds of failing: 4 rounds catch it 15 times in 16."""
    client = edge.client()
    for round_ in range(4):
        session = {**CLOUD, "x-session-id": f"stall-{uuid.uuid4().hex}"}
        first = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers=session,
        )  # fmt: skip
        victim = workers[_worker_of(first.usage)]
        assert victim.child is not None
        resume = threading.Timer(3 * STALL_TIMEOUT_S, os.killpg, (victim.child.pid, signal.SIGCONT))

        def stall(pid: int = victim.child.pid, resume: threading.Timer = resume) -> None:
            os.killpg(pid, signal.SIGSTOP)
            resume.start()

        try:
            finish, usage, stopped = _stream_with_fault(
                client, f"Round {round_}: go on.", session, stall
            )
        finally:
            resume.join()
        assert stopped, "the stream ended before the fault"
        assert finish == "length" and usage is not None
        assert usage.completion_tokens == 60  # every token once: none lost, none twice
        assert _worker_of(usage) != victim.worker_id
        wait_heard(edge)  # the resumed worker's heartbeats are fresh again
    assert edge.log().count("went quiet") >= 4


def test_a_cloud_answer_whose_workers_all_stall_is_finished_on_the_edge(
    edge: EdgeProcess, workers: dict[str, WorkerProcess]
) -> None:
    """A partition mid-answer (every worker stopped): failover finds no one, and the edge
    (policy ``cloud_unavailable: edge``, the default) finishes the answer after the
    cloud's tokens, marked in ``usage.tandem.fallback``; nothing lost, nothing twice."""
    client = edge.client()
    pids = [w.child.pid for w in workers.values() if w.child is not None]

    def stop_all() -> None:
        for pid in pids:
            os.killpg(pid, signal.SIGSTOP)

    session = {**CLOUD, "x-session-id": f"cut-{uuid.uuid4().hex}"}
    try:
        finish, usage, stopped = _stream_with_fault(client, "Partition: go on.", session, stop_all)
    finally:
        for pid in pids:
            os.killpg(pid, signal.SIGCONT)
    assert stopped, "the stream ended before the fault"
    assert finish == "length" and usage is not None
    assert usage.completion_tokens == 60  # the cloud's tokens and the edge's, each once
    tandem = dict(usage.model_extra or {})["tandem"]
    assert tandem["route"] == "cloud"
    fallback = tandem["fallback"]
    assert fallback is not None and fallback["to"] == "edge-fallback"
    assert 4 <= fallback["at_token"] < 60, fallback  # 5 chunks: the role, then tokens
    assert "cloud" in fallback["error"]
    assert edge.metrics()["tandem_edge_cloud_fallbacks_total"] >= 1
    assert "the edge finishes" in edge.log()
    wait_heard(edge)  # the resumed workers' heartbeats are fresh again
