"""The edge on the mesh: heartbeats on NATS, and local serving whatever NATS does."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats

from mesh import subjects
from mesh.protocol import NodeHeartbeat
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

MODEL = DEFAULT_PAIR


def _next_beat(url: str, node_id: str) -> NodeHeartbeat:
    """The next heartbeat the node publishes (within 10 s)."""

    async def receive() -> NodeHeartbeat:
        nc = await nats.connect(url)
        try:
            sub = await nc.subscribe(subjects.node_load(node_id))
            msg = await sub.next_msg(timeout=10)
            return NodeHeartbeat.from_bytes(msg.data)
        finally:
            await nc.close()

    return asyncio.run(receive())


def _wait_mesh(edge: EdgeProcess, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{edge.base_url}/health").json()["mesh"] != state:
        assert time.monotonic() < deadline, f"mesh never became {state}"
        time.sleep(0.1)


def test_edge_registers_and_survives_nats_going_away() -> None:
    with (
        EmbeddedNats() as server,
        EdgeProcess(nats_url=server.url, node_id="edge-t1", heartbeat_s=0.2) as edge,
    ):
        beat = _next_beat(server.url, "edge-t1")
        assert (beat.role, beat.model, beat.node_id) == ("edge", MODEL, "edge-t1")
        assert beat.endpoint == f"http://127.0.0.1:{edge.port}"

        server.stop()
        _wait_mesh(edge, "disconnected")
        answer = edge.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.choices[0].message.content is not None

        server.start()  # same port: the edge reconnects by itself
        _wait_mesh(edge, "connected")
        again = _next_beat(server.url, "edge-t1")
        assert again.sent_at > beat.sent_at


def test_edge_starts_without_nats_and_joins_later() -> None:
    server = EmbeddedNats()
    server.start()
    url = server.url
    server.stop()
    with EdgeProcess(nats_url=url, node_id="edge-t2", heartbeat_s=0.2) as edge:
        assert httpx.get(f"{edge.base_url}/health").json()["mesh"] == "disconnected"
        server.start()
        try:
            _wait_mesh(edge, "connected")
            beat = _next_beat(url, "edge-t2")
            assert beat.node_id == "edge-t2"
        finally:
            server.stop()
