"""A simulated edge and a simulated cloud worker serve real requests over real NATS.

Real processes (``tandem edge serve --engine sim``, ``tandem cloud serve --engine
sim``), a real nats-server, the official openai client. Only the forward pass is
simulated, and every answer must say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mesh import subjects
from mesh.connection import connect
from mesh.errors import NatsPortInUseError
from mesh.protocol import NodeHeartbeat
from mesh.server import EmbeddedNats, free_port
from models.catalog import DEFAULT_PAIR
from models.sim_vocab import FILLER_TEXT
from tandem.lifeline import group_members
from tandem.local import EdgeProcess, WorkerProcess, tandem_argv, wait_heard
from tandem.supervisor import Child, Supervisor

pytestmark = pytest.mark.timeout(120)

MODEL = DEFAULT_PAIR
WORKER_ID = "sim-worker-1"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def sim_worker(nats_server: EmbeddedNats) -> Iterator[WorkerProcess]:
    """A simulated cloud worker process on the session's NATS."""
    worker = WorkerProcess(nats_server, WORKER_ID, engine="sim")
    worker.start()
    try:
        worker.wait_ready(timeout_s=60)
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def sim_edge(nats_server: EmbeddedNats, sim_worker: WorkerProcess) -> Iterator[EdgeProcess]:
    """A simulated edge on the same mesh, once it has seen the worker's heartbeat."""
    with EdgeProcess(engine="sim", nats_url=nats_server.url, slots=4) as edge:
        wait_heard(edge)
        yield edge


def _tandem(usage: Any) -> dict[str, Any]:
    extra: dict[str, Any] = dict(usage.model_extra or {})["tandem"]
    return extra


def test_cloud_route_answer_comes_from_the_sim_worker_and_is_labelled(
    sim_edge: EdgeProcess,
) -> None:
    client = sim_edge.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        extra_headers={"x-tandem-route": "cloud"},
    )
    answer = raw.parse()
    assert raw.headers["x-tandem-route"] == "cloud"
    assert raw.headers["x-tandem-engine"] == "sim"
    assert answer.system_fingerprint == "tandem-simulated-engine"
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    tandem = _tandem(answer.usage)
    assert tandem["simulated"] is True
    assert tandem["worker_id"] == WORKER_ID
    assert tandem["simulated_engine_ms"] > 0
    content = answer.choices[0].message.content or ""
    assert content and FILLER_TEXT.startswith(content)
    assert answer.choices[0].finish_reason == "length"


def test_streamed_cloud_answer_carries_the_label_in_its_usage(sim_edge: EdgeProcess) -> None:
    client = sim_edge.client()
    stream = client.chat.completions.create(
        model=f"{MODEL}@cloud",
        messages=HELLO,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and FILLER_TEXT.startswith(text)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8
    assert _tandem(usage)["simulated"] is True
    assert chunks[-1].system_fingerprint == "tandem-simulated-engine"


def test_edge_route_answer_comes_from_the_sim_edge_and_is_labelled(sim_edge: EdgeProcess) -> None:
    client = sim_edge.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=5
    )
    answer = raw.parse()
    assert raw.headers["x-tandem-route"] == "edge"
    assert raw.headers["x-tandem-engine"] == "sim"
    assert answer.usage is not None
    tandem = _tandem(answer.usage)
    assert tandem["route"] == "edge" and tandem["simulated"] is True
    assert tandem["worker_id"] is None
    assert sim_edge.metrics()["tandem_edge_simulated_engine"] == 1


def test_speculative_route_is_refused_clearly_by_the_sim_edge(sim_edge: EdgeProcess) -> None:
    client = sim_edge.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=f"{MODEL}@speculative", messages=HELLO, max_tokens=5, temperature=0
        )
    error = caught.value
    assert error.status_code == 400
    assert "simulated engine" in str(error.body)


def test_sim_nodes_say_so_in_their_heartbeats(
    nats_server: EmbeddedNats, sim_edge: EdgeProcess
) -> None:
    async def collect() -> dict[str, NodeHeartbeat]:
        nc = await connect(nats_server.url, name="sim-test")
        beats: dict[str, NodeHeartbeat] = {}
        both = asyncio.Event()

        async def on_beat(msg: Any) -> None:
            beat = NodeHeartbeat.from_bytes(msg.data)
            beats[beat.role] = beat
            if len(beats) == 2:
                both.set()

        await nc.subscribe(subjects.all_node_loads(), cb=on_beat)
        try:
            await asyncio.wait_for(both.wait(), 5)
        finally:
            await nc.close()
        return beats

    beats = asyncio.run(collect())
    assert beats["cloud"].simulated is True
    assert beats["cloud"].node_id == WORKER_ID
    assert beats["edge"].simulated is True


def _start_up(supervisor: Supervisor, home: Path, port: int, nats_port: int) -> Child:
    """``tandem up --engine sim`` with its own TANDEM_HOME, once it says it is up."""
    argv = tandem_argv("up", "--engine", "sim", "--nats-port", str(nats_port), "--port", str(port))
    log = home / "up.log"
    up = supervisor.start("tandem up", argv, env={"TANDEM_HOME": str(home)}, log_path=log)
    up.wait_ready(lambda: "Tandem is up" in up.log(), timeout_s=90, poll_s=0.3)
    return up


def _ask_cloud(port: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    with client:
        answer = client.chat.completions.create(
            model=f"{MODEL}@cloud", messages=HELLO, max_tokens=6
        )
    assert answer.usage is not None
    return _tandem(answer.usage)


def test_tandem_up_with_the_sim_engine_serves_labelled_answers(tmp_path: Path) -> None:
    port = free_port()
    with Supervisor() as supervisor:
        up = _start_up(supervisor, tmp_path, port, nats_port=0)
        assert "SIMULATED" in up.log()
        time.sleep(2.5)  # the edge hears the worker's heartbeats
        tandem = _ask_cloud(port)
        assert tandem["simulated"] is True
        assert tandem["route"] == "cloud"


def test_sigkill_of_tandem_up_leaves_no_orphan_and_frees_the_nats_port(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    with Supervisor() as supervisor:
        up = _start_up(supervisor, tmp_path, port, nats_port)
        records = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("*.pid")]
        assert sorted(r["name"] for r in records) == ["cloud", "edge", "nats-server"]
        groups = [int(r["process"]["pid"]) for r in records]
        up.popen.kill()  # tandem up alone, as `kill -9 <pid>` would
        deadline = time.monotonic() + 30
        while any(group_members(g) for g in groups):
            assert time.monotonic() < deadline, "tandem up's roles outlived it"
            time.sleep(0.1)
        with EmbeddedNats(port=nats_port) as nats:  # nothing holds the port any more
            assert nats.port == nats_port


def _lifeline_of(pid: int) -> int:
    """The lifeline watcher a supervisor process started (its child running tandem.lifeline)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid and b"tandem.lifeline" in cmdline:
                return int(entry.name)
    raise AssertionError(f"process {pid} has no lifeline")


def test_a_tandem_up_that_finds_a_killed_runs_nats_reaps_it(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    with Supervisor() as supervisor:
        first = _start_up(supervisor, tmp_path, port, nats_port)
        # Lifeline and tandem up both killed: its nats-server and roles stay, holding ports.
        os.kill(_lifeline_of(first.pid), signal.SIGKILL)
        first.popen.kill()
        first.popen.wait()
        with pytest.raises(NatsPortInUseError):
            EmbeddedNats(port=nats_port).start()
        second = _start_up(supervisor, tmp_path, port, nats_port)
        assert "reaping stale nats-server" in second.log()
        time.sleep(2.5)  # the edge hears the worker's heartbeats
        assert _ask_cloud(port)["simulated"] is True
