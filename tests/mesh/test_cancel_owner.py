"""Cancels carry their sender, and the hub lets an edge send only its own.

A worker honours a cancel only from the request's owner (``cloud.worker``); these tests
check the half the hub enforces, against a real nats-server running ``tandem mesh``'s
configuration: an edge may publish cancels under its own name and no other, and every
node's cancels reach a worker. The worker's half runs against real workers in
``tests/cloud/test_cloud_route.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.protocol import CancelRequest
from mesh.security import MeshDir, Role
from mesh.server import EmbeddedNats
from tests.fixtures_nats import mesh_with
from tests.mesh.helpers import eventually
from tests.mesh.test_security import Node, _node

pytestmark = pytest.mark.timeout(60)

MODEL = "smollm2-135m"
CANCEL = CancelRequest(request_id="req-of-edge-a").to_bytes()


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    identities: dict[str, Role] = {"edge-a": "edge", "edge-b": "edge", "w1": "worker"}
    return mesh_with(tmp_path_factory.mktemp("mesh"), identities)


@pytest.fixture(scope="module")
def hub(mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(config=mesh_dir.auth_conf) as server:
        yield server


async def _cancels_heard_by_worker(hub: EmbeddedNats, mesh_dir: MeshDir) -> tuple[Node, list[str]]:
    """A worker subscribed to every node's cancels of ``MODEL``; the subjects it hears."""
    worker = await _node(hub, mesh_dir, "w1")
    heard: list[str] = []

    async def hear(msg: Msg) -> None:
        heard.append(msg.subject)

    await worker.nc.subscribe(subjects.cloud_cancels(model=MODEL), cb=hear)
    await worker.nc.flush()
    return worker, heard


async def test_an_edge_cancels_under_its_own_name_and_workers_hear_it(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    worker, heard = await _cancels_heard_by_worker(hub, mesh_dir)
    edge = await _node(hub, mesh_dir, "edge-a")
    try:
        await edge.nc.publish(subjects.cloud_cancel(MODEL, "edge-a"), CANCEL)
        await edge.nc.flush()
        await eventually(lambda: bool(heard), timeout_s=5)
        assert heard == [subjects.cloud_cancel(MODEL, "edge-a")]
        assert not edge.refusals and not worker.refusals
    finally:
        await edge.nc.close()
        await worker.nc.close()


async def test_an_edge_may_not_cancel_as_another_edge(hub: EmbeddedNats, mesh_dir: MeshDir) -> None:
    worker, heard = await _cancels_heard_by_worker(hub, mesh_dir)
    edge = await _node(hub, mesh_dir, "edge-a")
    forged = subjects.cloud_cancel(MODEL, "edge-b")
    try:
        await edge.nc.publish(forged, CANCEL)
        await edge.nc.flush()
        assert await edge.refused(forged), f"publish {forged} was not refused"
        await worker.nc.flush()
        assert heard == []  # the hub dropped it: no worker ever sees the forged cancel
    finally:
        await edge.nc.close()
        await worker.nc.close()


async def test_an_open_mesh_names_a_nodes_inboxes_after_it(nats_server: EmbeddedNats) -> None:
    """Without credentials too, a stream's inbox says whose it is (the owner a worker
    checks a cancel against), so cancels work alike on open and secured meshes."""
    nc = await connect(nats_server.url, name="edge-open", credentials=MeshCredentials())
    try:
        assert subjects.inbox_owner(nc.new_inbox()) == "edge-open"
    finally:
        await nc.close()
