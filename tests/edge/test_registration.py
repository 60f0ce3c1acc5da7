"""The edge on the mesh: heartbeats on NATS, and local serving whatever NATS does."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats

from mesh import subjects
from mesh.protocol import NodeHeartbeat
from mesh.server import EmbeddedNats
from tests.edge_process import EdgeProcess

MODEL = "smollm2-135m"


async def _next_beat(url: str, node_id: str, timeout: float = 10.0) -> NodeHeartbeat:
    nc = await nats.connect(url)
    try:
        sub = await nc.subscribe(subjects.node_load(node_id))
        msg = await sub.next_msg(timeout=timeout)
        return NodeHeartbeat.from_bytes(msg.data)
    finally:
        await nc.close()


def _wait_mesh(edge: EdgeProcess, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{edge.base_url}/health").json()["mesh"] != state:
        assert time.monotonic() < deadline, f"mesh never became {state}"
        time.sleep(0.1)


async def test_edge_registers_and_survives_nats_going_away() -> None:
    with EmbeddedNats() as server, EdgeProcess(nats_url=server.url, node_id="edge-t1",
                                               heartbeat_s=0.2) as edge:
        beat = await _next_beat(server.url, "edge-t1")
        assert (beat.role, beat.model, beat.node_id) == ("edge", MODEL, "edge-t1")
        assert beat.endpoint == f"http://127.0.0.1:{edge.port}"

        server.stop()
        _wait_mesh(edge, "disconnected")
        answer = edge.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert answer.choices[0].message.content is not None

        server.start()  # same port: the edge reconnects by itself
        _wait_mesh(edge, "connected")
        again = await _next_beat(server.url, "edge-t1")
        assert again.sent_at > beat.sent_at


async def test_edge_starts_without_nats_and_joins_later() -> None:
    server = EmbeddedNats()
    server.start()
    url = server.url
    server.stop()
    with EdgeProcess(nats_url=url, node_id="edge-t2", heartbeat_s=0.2) as edge:
        assert httpx.get(f"{edge.base_url}/health").json()["mesh"] == "disconnected"
        server.start()
        try:
            _wait_mesh(edge, "connected")
            beat = await asyncio.wait_for(_next_beat(url, "edge-t2"), 15)
            assert beat.node_id == "edge-t2"
        finally:
            server.stop()
