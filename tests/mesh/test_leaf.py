"""Edges as leaf nodes (``mesh.leaf``) against real nats-servers.

The hub runs ``tandem mesh init``'s ``server.conf`` (JetStream with its store and domain
from there), an edge's own server runs the
``DIR/leaf/NAME.conf`` that ``tandem mesh add-edge`` wrote (without JetStream), each on
free ports. Across a leaf link the hub refuses silently (it drops what the edge may not
send and never forwards interest it may not have), so the tests look at what arrives and
at the servers' monitoring endpoints, never at a client's error callback.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from typer.testing import CliRunner

from mesh import leaf, subjects
from mesh.connection import MeshCredentials, connect
from mesh.security import MeshDir, Role, public_key
from mesh.server import EmbeddedNats, free_port
from router.store import PolicyStore
from tandem.cli import app

MODEL = "smollm2-135m"
POLICY = "rules: [{name: local, route: edge}]\n"
POLICY_2 = "rules: [{name: cloudy, route: cloud}]\ndefault: {route: cloud}\n"
_WAIT_S = 10.0

pytestmark = pytest.mark.timeout(60)


def _mesh(root: Path, identities: dict[str, Role], **init: Any) -> MeshDir:
    mesh = MeshDir(root)
    mesh.init(leaf_port=free_port(), **init)
    for name, role in identities.items():
        mesh.add(name, role)
    return mesh


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    identities: dict[str, Role] = {
        "operator": "operator", "edge-a": "edge", "edge-b": "edge", "w1": "worker"
    }  # fmt: skip
    return _mesh(tmp_path_factory.mktemp("leaf-mesh"), identities)


@pytest.fixture(scope="module")
def hub(mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(config=mesh_dir.server_conf, jetstream=False) as server:
        yield server


@pytest.fixture(scope="module")
def leaf_a(hub: EmbeddedNats, mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    """Edge edge-a's own server, attached to the hub."""
    with EmbeddedNats(config=mesh_dir.leaf_conf("edge-a"), jetstream=False) as server:
        _attached(hub, "edge-a")
        yield server


# -- helpers ----------------------------------------------------------------------------------


def _get(server: EmbeddedNats, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.monitor_url}{path}", timeout=2) as resp:
        return dict(json.load(resp))


def _leaf_link(hub: EmbeddedNats, edge: str) -> dict[str, Any] | None:
    """The hub's view of edge ``edge``'s leaf link (its server_name), if it is up."""
    for link in _get(hub, "/leafz?subs=1").get("leafs", []):
        if link["name"] == f"tandem-leaf-{subjects.token(edge)}":
            return dict(link)
    return None


def _wait_for(check: Callable[[], object], what: str, timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.02)


async def _until(check: Callable[[], object], what: str, timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.02)


def _attached(hub: EmbeddedNats, edge: str) -> None:
    _wait_for(lambda: _leaf_link(hub, edge) is not None, f"{edge}'s leaf link is up")


def _refused(leaf_server: EmbeddedNats) -> bool:
    assert leaf_server.log_path is not None
    return "authorization violation" in leaf_server.log_path.read_text().lower()


async def _node(url: str, mesh: MeshDir, name: str) -> Client:
    tls_ca = mesh.tls_ca if mesh.tls_ca.exists() else None
    return await connect(url, name=name, credentials=MeshCredentials(mesh.creds(name), tls_ca))


async def _serve_streaming(worker: Client, tokens: list[bytes]) -> None:
    """A stand-in worker on the hub: streams ``tokens`` to the reply subject named in the
    request, asks that the requester is still there (the worker's liveness probe), then
    answers the request once, as ``cloud.worker`` does."""

    async def serve(msg: Msg) -> None:
        stream = msg.data.decode()
        for chunk in tokens:
            await worker.publish(stream, chunk)
        probe = await worker.request(subjects.liveness(stream), b"", timeout=5)
        await worker.publish(stream, b"alive:" + probe.data)
        await msg.respond(b"accepted")

    await worker.subscribe(subjects.cloud_generate(MODEL), queue="q", cb=serve)
    await worker.flush()


async def _stream_from_leaf(edge: Client, reply_subject: str, n: int) -> tuple[bytes, list[bytes]]:
    """Ask for a generation from the edge's side: the request's reply and ``n`` stream
    messages, the last being the answer to the worker's liveness probe."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def receive(msg: Msg) -> None:
        got.append(msg.data)
        if len(got) == n:
            done.set()

    async def alive(msg: Msg) -> None:
        await msg.respond(b"yes")

    await edge.subscribe(reply_subject, cb=receive)
    await edge.subscribe(subjects.liveness(reply_subject), cb=alive)
    reply = await edge.request(subjects.cloud_generate(MODEL), reply_subject.encode(), timeout=5)
    await asyncio.wait_for(done.wait(), 5)
    return reply.data, got


def _collect(into: list[bytes]) -> Callable[[Msg], Awaitable[None]]:
    async def receive(msg: Msg) -> None:
        into.append(msg.data)

    return receive


def _knows(leaf_server: EmbeddedNats, subject: str) -> Callable[[], bool]:
    """Whether the hub's interest in ``subject`` reached the leaf (its /subsz leaves out
    what it learnt over a leaf link; its /leafz lists it, queue group after a space)."""

    def check() -> bool:
        links = _get(leaf_server, "/leafz?subs=1").get("leafs", [])
        return any(s.split()[0] == subject for link in links for s in link["subscriptions_list"])

    return check


# -- (a) reaching the cloud --------------------------------------------------------------------


async def test_an_edge_behind_its_leaf_gets_a_streamed_answer_from_a_hub_worker(
    hub: EmbeddedNats, leaf_a: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    worker = await _node(hub.url, mesh_dir, "w1")
    edge = await _node(leaf_a.url, mesh_dir, "edge-a")  # the edge's own server, on loopback
    try:
        await _serve_streaming(worker, [b"Hel", b"lo"])
        await _until(_knows(leaf_a, subjects.cloud_generate(MODEL)), "the leaf learns the worker")
        reply, got = await _stream_from_leaf(edge, "_INBOX.edge-a.stream-a", 3)
        assert reply == b"accepted"
        # The probe's answer crossed the link back to the worker's inbox: a worker on the
        # hub keeps generating for an edge behind a leaf.
        assert got == [b"Hel", b"lo", b"alive:yes"]
    finally:
        await edge.close()
        await worker.close()


async def test_the_leaf_link_carries_only_the_edge_permissions(
    hub: EmbeddedNats, leaf_a: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator = await _node(hub.url, mesh_dir, "operator")
    edge = await _node(leaf_a.url, mesh_dir, "edge-a")
    worker = await _node(hub.url, mesh_dir, "w1")
    try:
        store = await PolicyStore.open(operator)
        before = await store.current()
        # A model edge-a was not admitted for (it has the default pair): a hub worker
        # serves it, then the edge's own model, so once the leaf knows the latter it has
        # heard whatever the hub forwards of the former.
        stranger: list[bytes] = []
        await worker.subscribe(subjects.cloud_generate("third-model"), "q", _collect(stranger))
        await worker.subscribe(subjects.cloud_generate(MODEL), "q", _collect([]))
        await worker.flush()
        await _until(_knows(leaf_a, subjects.cloud_generate(MODEL)), "the leaf learns the worker")
        await edge.publish(subjects.cloud_generate("third-model"), b"prompt")
        serving = subjects.cloud_generate("other-model")
        await edge.subscribe(serving, queue="q")  # answering as a worker
        await edge.subscribe("_INBOX.edge-b.>")  # another edge's inbox
        await edge.publish(f"$KV.{subjects.POLICY_BUCKET}.{subjects.POLICY_KEY}", b"x")
        beats: list[bytes] = []
        await operator.subscribe(subjects.all_node_loads(), cb=_collect(beats))
        await operator.flush()
        await _until(_knows(leaf_a, subjects.all_node_loads()), "the leaf learns the operator")
        # Then something the edge may do, on the same link: once it arrived, everything
        # before it has been dealt with.
        await edge.subscribe("_INBOX.edge-a.control")
        await edge.publish(subjects.node_load("edge-a"), b"beat")
        await edge.flush()
        await _until(_knows(hub, "_INBOX.edge-a.control"), "the edge's own inbox reaches the hub")
        await _until(lambda: beats == [b"beat"], "the edge's heartbeat reaches the hub")
        assert hub.subscribers(serving) == 0
        assert hub.subscribers("_INBOX.edge-b.x") == 0
        assert stranger == []  # another model's queue group never heard the edge
        assert await store.current() == before  # the policy write never landed
        assert _leaf_link(hub, "edge-a") is not None  # and the link stays up
    finally:
        await edge.close()
        await worker.close()
        await operator.close()


# -- (b) the policy -----------------------------------------------------------------------------


async def test_an_edge_behind_its_leaf_follows_the_policy_in_the_hub_domain(
    hub: EmbeddedNats, leaf_a: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator = await _node(hub.url, mesh_dir, "operator")
    edge = await _node(leaf_a.url, mesh_dir, "edge-a")
    try:
        written = await PolicyStore.open(operator)
        current = await written.current()
        first = await written.set(
            POLICY, expect_revision=current.revision if current else 0, author="t"
        )
        followed = await PolicyStore.open(edge, create=False)  # through the leaf
        assert (await followed.current()).revision == first  # type: ignore[union-attr]
        seen: list[int] = []
        caught_up = asyncio.Event()

        async def watch() -> None:
            async for stored in followed.watch():
                seen.append(stored.revision)
                caught_up.set()
                if len(seen) == 2:
                    return

        watching = asyncio.create_task(watch())
        await asyncio.wait_for(caught_up.wait(), 5)
        second = await written.set(POLICY_2, expect_revision=first, author="t")
        await asyncio.wait_for(watching, 5)
        assert seen == [first, second]
    finally:
        await edge.close()
        await operator.close()


# -- (c) edge-local subjects --------------------------------------------------------------------


async def test_edge_local_subjects_never_leave_the_leaf(
    hub: EmbeddedNats, leaf_a: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator = await _node(hub.url, mesh_dir, "operator")
    edge = await _node(leaf_a.url, mesh_dir, "edge-a")
    local_tool = await _node(leaf_a.url, mesh_dir, "edge-a")  # another process of the edge
    try:
        heard: list[bytes] = []
        beats: list[bytes] = []

        async def answer(msg: Msg) -> None:
            await msg.respond(b"pong")

        await local_tool.subscribe(subjects.local("ping"), cb=answer)
        await local_tool.subscribe(subjects.local_any(), cb=_collect(heard))
        await local_tool.flush()
        await operator.subscribe(subjects.all_node_loads(), cb=_collect(beats))
        await operator.flush()
        await _until(_knows(leaf_a, subjects.all_node_loads()), "the leaf learns the operator")
        sent_before = _leaf_link(hub, "edge-a")["in_msgs"]  # type: ignore[index]
        for i in range(5):
            await edge.publish(subjects.local("chatter"), b"%d" % i)
        assert (await edge.request(subjects.local("ping"), b"", timeout=2)).data == b"pong"
        await edge.publish(subjects.node_load("edge-a"), b"beat")  # the one that may cross
        await _until(lambda: beats == [b"beat"], "the heartbeat reaches the hub")
        await _until(lambda: len(heard) == 6, "the local subscriber hears all local traffic")
        sent = _leaf_link(hub, "edge-a")["in_msgs"] - sent_before  # type: ignore[index]
        assert sent == 1  # the heartbeat alone crossed the link
        assert hub.subscribers(subjects.local("ping")) == 0  # no local interest either
    finally:
        for nc in (edge, local_tool, operator):
            await nc.close()


# -- (d) who may open a leaf link ---------------------------------------------------------------


def test_a_revoked_edges_leaf_link_is_cut_within_seconds_and_others_stay(
    tmp_path: Path,
) -> None:
    mesh = _mesh(tmp_path / "mesh", {"edge-gone": "edge", "edge-stays": "edge"})
    with EmbeddedNats(config=mesh.server_conf, jetstream=False) as hub:
        with EmbeddedNats(config=mesh.leaf_conf("edge-gone"), jetstream=False) as gone, \
                EmbeddedNats(config=mesh.leaf_conf("edge-stays"), jetstream=False):  # fmt: skip
            _attached(hub, "edge-gone")
            _attached(hub, "edge-stays")
            stays = _leaf_link(hub, "edge-stays")
            started = time.monotonic()
            # A reload re-checks the hub's clients, never its leaf links: tandem mesh revoke
            # closes the revoked edge's link through the hub's system account.
            result = CliRunner().invoke(
                app, ["mesh", "revoke", "edge-gone", "--dir", str(mesh.root), "--hub-url", hub.url]
            )
            assert result.exit_code == 0, result.output
            assert "closed leaf links: tandem-leaf-edge-gone" in result.output
            assert not mesh.leaf_conf("edge-gone").exists()
            _wait_for(lambda: _refused(gone), "the leaf's relinks are refused")
            assert _leaf_link(hub, "edge-gone") is None
            assert time.monotonic() - started < 5
            after = _leaf_link(hub, "edge-stays")  # the other edge's link was not touched
            assert after is not None and stays is not None and after["id"] == stays["id"]


def _with_seed(name: str, seed: bytes, hub_url: str) -> str:
    return leaf.render_edge_leaf(name, public_key=public_key(seed), seed=seed, hub_url=hub_url)


@pytest.mark.parametrize("credential", ["another mesh's key", "none", "a worker's key"])
def test_a_leaf_link_without_an_edge_identity_is_refused(
    hub: EmbeddedNats, mesh_dir: MeshDir, tmp_path: Path, credential: str
) -> None:
    hub_url = mesh_dir.hub_leaf_url.read_text().strip()
    if credential == "another mesh's key":
        name = "edge-b"  # a name the hub knows, with a key it never saw
        stranger = _mesh(tmp_path / "stranger", {name: "edge"})
        text = (
            stranger.leaf_conf(name)
            .read_text()
            .replace(stranger.hub_leaf_url.read_text().strip(), hub_url)
        )
    elif credential == "none":
        text = re.sub(r"(?m)^\s*nkey: .*$", "", mesh_dir.leaf_conf("edge-b").read_text())
        name = "edge-b"
    else:  # the worker's seed may connect directly, never as a leaf
        name = "w1"
        text = _with_seed(name, mesh_dir.creds(name).read_bytes().strip(), hub_url)
    config = tmp_path / "leaf.conf"
    config.write_text(text)
    with EmbeddedNats(config=config, jetstream=False) as refused:
        _wait_for(lambda: _refused(refused), "the hub refuses the leaf link")
        assert _leaf_link(hub, name) is None


# -- (e) TLS ------------------------------------------------------------------------------------


async def test_a_leaf_reaches_a_tls_hub_over_tls(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path / "mesh", {"edge-t": "edge", "w-t": "worker"}, tls_hosts=["127.0.0.1"])
    assert mesh.hub_leaf_url.read_text().strip().startswith("nats-leaf://127.0.0.1:")
    with (
        EmbeddedNats(config=mesh.server_conf, jetstream=False) as hub,
        EmbeddedNats(config=mesh.leaf_conf("edge-t"), jetstream=False) as own,
    ):
        assert _get(hub, "/varz")["leaf"]["tls_required"] is True  # no plain-text leaf link
        _attached(hub, "edge-t")
        worker = await _node(hub.url, mesh, "w-t")  # workers reach the hub over TLS too
        edge = await _node(own.url, mesh, "edge-t")
        try:
            await _serve_streaming(worker, [b"tls"])
            await _until(_knows(own, subjects.cloud_generate(MODEL)), "the leaf learns the worker")
            reply, got = await _stream_from_leaf(edge, "_INBOX.edge-t.stream-t", 2)
            assert (reply, got) == (b"accepted", [b"tls", b"alive:yes"])
        finally:
            await edge.close()
            await worker.close()


# -- (f) a WAN outage ---------------------------------------------------------------------------


async def _local_round_trip(edge: Client, responder: Client) -> bytes:
    async def answer(msg: Msg) -> None:
        await msg.respond(b"still here")

    sub = await responder.subscribe(subjects.local("status"), cb=answer)
    await responder.flush()
    try:
        return (await edge.request(subjects.local("status"), b"", timeout=2)).data
    finally:
        await sub.unsubscribe()


async def test_edge_local_traffic_survives_the_hub_going_down(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path / "mesh", {"edge-w": "edge", "w-w": "worker"})
    hub = EmbeddedNats(config=mesh.server_conf, jetstream=False)
    hub.start()
    try:
        with EmbeddedNats(config=mesh.leaf_conf("edge-w"), jetstream=False) as own:
            _attached(hub, "edge-w")
            worker = await _node(hub.url, mesh, "w-w")
            edge = await _node(own.url, mesh, "edge-w")
            local_tool = await _node(own.url, mesh, "edge-w")
            try:
                await _serve_streaming(worker, [b"a"])
                hub.stop()  # the WAN goes away
                await _until(lambda: _get(own, "/leafz")["leafnodes"] == 0, "the link drops")
                assert await _local_round_trip(edge, local_tool) == b"still here"
                hub.start()  # ... and comes back: the leaf reconnects on its own
                await _until(lambda: _leaf_link(hub, "edge-w") is not None, "the link is back")
                await _until(lambda: worker.is_connected, "the worker is back")
                await _until(_knows(own, subjects.cloud_generate(MODEL)), "the leaf relearns it")
                reply, got = await _stream_from_leaf(edge, "_INBOX.edge-w.stream-w", 2)
                assert (reply, got) == (b"accepted", [b"a", b"alive:yes"])
            finally:
                for nc in (edge, local_tool, worker):
                    await nc.close()
    finally:
        hub.stop()


# -- the rendered files -------------------------------------------------------------------------


def test_edge_leaf_config_is_secret_and_names_the_hub(tmp_path: Path) -> None:
    mesh = MeshDir(tmp_path)
    mesh.init(leaf_port=7500)
    mesh.add("kitchen", "edge", hub_url="nats-leaf://hub.example:7500", local_port=4300)
    mesh.add("w", "worker")
    conf = mesh.leaf_conf("kitchen")
    assert conf.stat().st_mode & 0o777 == 0o600  # it holds the edge's seed
    text = conf.read_text()
    assert mesh.creds("kitchen").read_text().strip() in text
    assert '"nats-leaf://hub.example:7500"' in text and '"127.0.0.1:4300"' in text
    assert not mesh.leaf_conf("w").exists()  # edges only
    assert '"127.0.0.1:7500"' in mesh.server_conf.read_text()
    assert f'domain: "{subjects.HUB_JS_DOMAIN}"' in mesh.server_conf.read_text()


def test_tandem_mesh_writes_the_leaf_configs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    root = tmp_path / "mesh"
    runner = CliRunner()
    result = runner.invoke(app, ["mesh", "init", str(root), "--leaf-port", "7600"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["mesh", "add-edge", "porch", "--dir", str(root)])
    assert result.exit_code == 0, result.output
    mesh = MeshDir(root)
    assert str(mesh.leaf_conf("porch")) in result.output
    assert '"nats-leaf://127.0.0.1:7600"' in mesh.leaf_conf("porch").read_text()
    result = runner.invoke(app, ["mesh", "revoke", "porch", "--dir", str(root)])
    assert result.exit_code == 0, result.output
    assert "hub not running" in result.output
    assert not mesh.leaf_conf("porch").exists()
