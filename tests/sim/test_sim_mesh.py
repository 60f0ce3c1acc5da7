"""A simulated edge and a simulated cloud worker serve real requests over real NATS.

Real processes (``tandem edge serve --engine sim``, ``tandem cloud serve --engine
sim``), a real nats-server, the official openai client. Only the forward pass is
simulated, and every answer must say so.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mesh import subjects
from mesh.connection import connect
from mesh.protocol import NodeHeartbeat
from mesh.server import EmbeddedNats, stop_process
from models.sim_vocab import FILLER_TEXT
from tests.edge_process import EdgeProcess, free_port

pytestmark = pytest.mark.timeout(120)

MODEL = "smollm2-135m"
WORKER_ID = "sim-worker-1"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def sim_worker(nats_server: EmbeddedNats) -> Iterator[subprocess.Popen[bytes]]:
    """A simulated cloud worker process on the session's NATS."""
    argv = [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--engine", "sim"]
    env = {
        **os.environ,
        "TANDEM_CLOUD_NATS_URL": nats_server.url,
        "TANDEM_CLOUD_WORKER_ID": WORKER_ID,
    }
    log = Path(tempfile.mkstemp(prefix="tandem-sim-worker-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while nats_server.subscribers(subjects.worker(WORKER_ID, "generate")) == 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield proc
    finally:
        stop_process(proc, grace_s=10, name="sim worker")
        log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sim_edge(
    nats_server: EmbeddedNats, sim_worker: subprocess.Popen[bytes]
) -> Iterator[EdgeProcess]:
    """A simulated edge on the same mesh, once it has seen the worker's heartbeat."""
    with EdgeProcess(engine="sim", nats_url=nats_server.url, slots=4) as edge:
        deadline = time.monotonic() + 20
        while httpx.get(f"{edge.base_url}/health").json()["mesh"] != "connected":
            assert time.monotonic() < deadline, edge.log()
            time.sleep(0.2)
        time.sleep(2.5)  # a couple of heartbeats
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


def test_tandem_up_with_the_sim_engine_serves_labelled_answers(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "up", "--engine", "sim", "--nats-port", "0"]
    argv += ["--port", str(port)]
    env = {**os.environ, "TANDEM_HOME": str(tmp_path)}
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while "Tandem is up" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert "SIMULATED" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with client:
            time.sleep(2.5)  # the edge hears the worker's heartbeats
            answer = client.chat.completions.create(
                model=f"{MODEL}@cloud", messages=HELLO, max_tokens=6
            )
        assert answer.usage is not None
        assert _tandem(answer.usage)["simulated"] is True
        assert _tandem(answer.usage)["route"] == "cloud"
    finally:
        stop_process(proc, grace_s=20, name="tandem up", kill_group=True)
