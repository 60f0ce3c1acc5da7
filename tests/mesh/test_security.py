"""The mesh's identities against a real nats-server running ``tandem mesh``'s configuration.

For every permission of ``mesh.security``: the allowed action works, and the forbidden
one is refused by the server (nats-py reports a refused subscribe or publish only
asynchronously, to ``error_cb``: the tests collect those reports).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client

from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.errors import MeshUnavailableError
from mesh.security import MeshConfigError, MeshDir, Role, inbox_prefix
from mesh.server import EmbeddedNats
from router.store import PolicyStore
from tests.fixtures_nats import mesh_with

MODEL = "smollm2-135m"  # the catalog's default pair: edges admitted with no model get it
OTHER, THIRD = "other-pair", "third-pair"
POLICY = "rules: [{name: local, route: edge}]\n"
POLICY_2 = "rules: [{name: cloudy, route: cloud}]\ndefault: {route: cloud}\n"


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    identities: dict[str, Role] = {
        "operator": "operator", "edge-a": "edge", "edge-b": "edge", "w1": "worker",
        "w2": "worker",
    }  # fmt: skip
    mesh = mesh_with(tmp_path_factory.mktemp("mesh"), identities)
    mesh.add("edge-o", "edge", models=[OTHER, THIRD])
    return mesh


@pytest.fixture(scope="module")
def hub(mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(config=mesh_dir.auth_conf) as server:
        yield server


class Node:
    """A client with one identity, collecting the server's asynchronous refusals."""

    def __init__(self, nc: Client, refusals: list[str]) -> None:
        self.nc, self.refusals = nc, refusals

    async def refused(self, what: str, wait_s: float = 2.0) -> bool:
        """Whether the server refused something naming ``what`` (waits for the report;
        nats-py lower-cases the server's message)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if any(what.lower() in r.lower() and "permissions violation" in r.lower()
                   for r in self.refusals):  # fmt: skip
                return True
            await asyncio.sleep(0.02)
        return False


async def _node(hub: EmbeddedNats, mesh: MeshDir, name: str) -> Node:
    refusals: list[str] = []

    async def error_cb(exc: Exception) -> None:
        refusals.append(str(exc))

    nc = await connect(
        hub.url, name=name, credentials=MeshCredentials(mesh.creds(name)), error_cb=error_cb
    )
    return Node(nc, refusals)


async def test_anonymous_and_unknown_clients_are_refused(hub: EmbeddedNats, tmp_path: Path) -> None:
    with pytest.raises(MeshUnavailableError, match=r"(?i)authorization"):
        await connect(hub.url, name="anonymous")
    stranger = MeshDir(tmp_path)
    stranger.init()
    stranger.add("edge-a", "edge")  # the same name, a key the hub never saw
    with pytest.raises(MeshUnavailableError, match=r"(?i)authorization"):
        await connect(hub.url, name="x", credentials=MeshCredentials(stranger.creds("edge-a")))


async def test_an_edge_asks_workers_and_reads_only_its_own_inbox(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    edge, worker = await _node(hub, mesh_dir, "edge-a"), await _node(hub, mesh_dir, "w1")
    try:
        stream = "_INBOX.edge-a.stream1"  # a reply subject under the edge's own prefix
        got: list[bytes] = []

        async def receive(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.data)

        await edge.nc.subscribe(stream, cb=receive)

        async def serve(msg: nats.aio.msg.Msg) -> None:
            await worker.nc.publish(stream, b"token")  # the worker streams to the edge ...
            await msg.respond(b"accepted")  # ... and answers the request once

        await worker.nc.subscribe(subjects.cloud_generate(MODEL), queue="q", cb=serve)
        await worker.nc.flush()
        reply = await edge.nc.request(subjects.cloud_generate(MODEL), b"prompt", timeout=5)
        assert reply.data == b"accepted"
        assert reply.subject.startswith(inbox_prefix("edge-a") + ".")  # its private inbox
        await asyncio.sleep(0.2)
        assert got == [b"token"]
        assert not edge.refusals and not worker.refusals
    finally:
        await edge.nc.close()
        await worker.nc.close()


async def test_a_token_stream_outlasts_the_response_permission(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    """A generation streams for as long as it lasts: the worker's chunks go to the edge's
    inbox under its explicit publish grant, not the response permission (one reply per
    request within its window, nats-server's default 1 message in 2 minutes). Proof by
    messages: after the one reply is spent, the stream still gets through, and so does a
    chunk with no request outstanding at all, which a response window could not allow."""
    edge, worker = await _node(hub, mesh_dir, "edge-a"), await _node(hub, mesh_dir, "w1")
    try:
        stream = "_INBOX.edge-a.long"
        got: list[bytes] = []

        async def receive(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.data)

        await edge.nc.subscribe(stream, cb=receive)

        async def serve(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"accepted")  # the one reply the request allows
            for i in range(50):
                await worker.nc.publish(stream, b"token %d" % i)

        await worker.nc.subscribe(subjects.cloud_generate(MODEL), queue="q", cb=serve)
        await worker.nc.flush()
        reply = await edge.nc.request(subjects.cloud_generate(MODEL), b"prompt", timeout=5)
        assert reply.data == b"accepted"
        await asyncio.sleep(0.3)
        await worker.nc.publish(stream, b"late")  # no request outstanding now
        await worker.nc.flush()
        await asyncio.sleep(0.3)
        assert got == [b"token %d" % i for i in range(50)] + [b"late"]
        assert not edge.refusals and not worker.refusals
    finally:
        await edge.nc.close()
        await worker.nc.close()


@pytest.mark.parametrize(
    ("name", "models", "stranger"),
    [("edge-a", [MODEL], OTHER), ("edge-o", [OTHER, THIRD], MODEL)],
)
async def test_an_edge_asks_only_for_its_models_and_any_worker_by_affinity(
    hub: EmbeddedNats, mesh_dir: MeshDir, name: str, models: list[str], stranger: str
) -> None:
    """Its models' generate and verify queue groups and a worker's own subjects answer;
    another model's subjects and cancels are refused by the hub and never reach a worker."""
    edge, worker = await _node(hub, mesh_dir, name), await _node(hub, mesh_dir, "w1")
    try:
        heard: list[str] = []

        async def serve(msg: nats.aio.msg.Msg) -> None:
            heard.append(msg.subject)
            if msg.reply:
                await msg.respond(b"ok")

        affinity = [subjects.worker("w1", "generate"), subjects.worker("w1", "verify")]
        for subject in affinity:  # only w1 listens on its own subjects
            await worker.nc.subscribe(subject, cb=serve)
        for model in [*models, stranger]:  # the queue groups, as nats.micro joins them
            for subject in (subjects.cloud_generate(model), subjects.cloud_verify(model)):
                await worker.nc.subscribe(subject, queue="q", cb=serve)
        await worker.nc.subscribe(subjects.cloud_cancels(), cb=serve)
        await worker.nc.flush()
        allowed = list(affinity)
        for model in models:
            allowed += [subjects.cloud_generate(model), subjects.cloud_verify(model)]
        for subject in allowed:
            assert await _answered(edge, subject), subject
        refused = [
            subjects.cloud_generate(stranger),
            subjects.cloud_verify(stranger),
            subjects.cloud_cancel(stranger, name),
        ]
        for subject in refused:
            await edge.nc.publish(subject, b"x", reply=f"{inbox_prefix(name)}.r")
        await edge.nc.flush()
        for subject in refused:
            assert await edge.refused(subject), f"{name} may publish on {subject}"
        assert heard == allowed  # nothing of the other model reached the worker
        assert not worker.refusals
    finally:
        await edge.nc.close()
        await worker.nc.close()


async def _answered(node: Node, subject: str) -> bool:
    """Whether a request on ``subject`` is answered "ok". A "no responders" answer is
    asked again a few times: CI once saw one for a subscription the worker had made and
    flushed just before (a refusal would be a permissions error, never this)."""
    for _ in range(5):
        try:
            return (await node.nc.request(subject, b"x", timeout=5)).data == b"ok"
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.2)
    return False


def test_an_edge_is_registered_with_its_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    mesh = MeshDir(tmp_path)
    mesh.init()
    result = CliRunner().invoke(
        app,
        ["mesh", "add-edge", "porch", "--model", OTHER, "--model", THIRD, "--dir", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    mesh.add("kitchen", "edge")  # no model: the catalog's default pair
    mesh.add("w", "worker")
    assert {n.name: n.models for n in mesh.nodes()} == {
        "porch": (OTHER, THIRD), "kitchen": (MODEL,), "w": (),
    }  # fmt: skip
    users = mesh.users_conf.read_text()
    assert (
        subjects.cloud_generate(THIRD) in users
        and json.dumps(subjects.cloud_any("generate")) not in users
    )
    listed = CliRunner().invoke(app, ["mesh", "list", "--dir", str(tmp_path)])
    assert f"models: {OTHER}, {THIRD}" in listed.output
    key = mesh.creds("kitchen").read_bytes()
    mesh.ensure("kitchen", "edge", models=[OTHER])  # tandem up with another model
    assert mesh.creds("kitchen").read_bytes() == key  # the same identity, another model
    assert {n.name: n.models for n in mesh.nodes()}["kitchen"] == (OTHER,)
    with pytest.raises(MeshConfigError, match="needs a model"):
        mesh.add("bare", "edge", models=[])
    with pytest.raises(MeshConfigError, match="only edges"):
        mesh.add("w2", "worker", models=[MODEL])
    assert "bare" not in {n.name for n in mesh.nodes()} and not mesh.creds("bare").exists()
    # An edge registered before edges had models asks for the default pair.
    registry = json.loads(mesh.registry.read_text())
    del registry[0]["models"]
    mesh.registry.write_text(json.dumps(registry))
    mesh.rerender()
    assert {n.name: n.models for n in mesh.nodes()}["porch"] == (MODEL,)


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("subscribe", ">"),  # everything
        ("subscribe", "_INBOX.edge-b.>"),  # another edge's inbox
        ("subscribe", "_INBOX.>"),  # every inbox
        ("serve", subjects.cloud_generate(MODEL)),  # answering as a worker
        ("publish", f"$KV.{subjects.POLICY_BUCKET}.{subjects.POLICY_KEY}"),  # writing the policy
        ("publish", subjects.node_load("w1")),  # a worker's heartbeats
        ("publish", "_INBOX.edge-b.stream"),  # into another edge's stream
        ("publish", subjects.cloud_prefill(MODEL)),  # the prefill pool: decode workers only
        ("publish", subjects.worker("w1", "prefill")),  # ... nor one prefill worker
        ("serve", subjects.cloud_prefill(MODEL)),  # nor serve as a prefill worker
    ],
)
async def test_an_edge_is_refused_what_it_does_not_need(
    hub: EmbeddedNats, mesh_dir: MeshDir, action: str, subject: str
) -> None:
    edge = await _node(hub, mesh_dir, "edge-a")
    try:
        if action == "publish":
            await edge.nc.publish(subject, b"x")
        else:
            await edge.nc.subscribe(subject, queue="q" if action == "serve" else "")
        await edge.nc.flush()
        assert await edge.refused(subject), f"{action} {subject} was not refused"
    finally:
        await edge.nc.close()


async def test_a_decode_worker_asks_the_prefill_pool_and_one_prefill_worker(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    """Worker to worker: w2 (decode) asks the prefill queue group and w1's own prefill
    subject (session affinity); w1 (prefill) serves both. Nothing is refused."""
    prefill, decode = await _node(hub, mesh_dir, "w1"), await _node(hub, mesh_dir, "w2")
    try:

        async def serve(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"kv ready")

        await prefill.nc.subscribe(subjects.cloud_prefill(MODEL), queue="q", cb=serve)
        await prefill.nc.subscribe(subjects.worker("w1", "prefill"), cb=serve)
        await prefill.nc.flush()
        for subject in (subjects.cloud_prefill(MODEL), subjects.worker("w1", "prefill")):
            reply = await decode.nc.request(subject, b"prompt ids", timeout=5)
            assert reply.data == b"kv ready"
        assert not prefill.refusals and not decode.refusals
    finally:
        await prefill.nc.close()
        await decode.nc.close()


async def test_a_decode_worker_follows_the_policy_but_cannot_write_it(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator, worker = await _node(hub, mesh_dir, "operator"), await _node(hub, mesh_dir, "w2")
    try:
        written = await PolicyStore.open(operator.nc)
        current = await written.current()
        revision = await written.set(
            "disaggregation: {remote_prefill: always}\n",
            expect_revision=current.revision if current else 0,
            author="t",
        )
        followed = await PolicyStore.open(worker.nc, create=False)
        stored = await followed.current()
        assert stored is not None and stored.revision == revision
        assert stored.policy is not None
        assert stored.policy.disaggregation.remote_prefill == "always"
        with pytest.raises(Exception):  # noqa: B017  # a worker reads, never writes
            await followed.set(POLICY, expect_revision=revision, author="worker")
        assert await worker.refused(f"$KV.{subjects.POLICY_BUCKET}")
    finally:
        await operator.nc.close()
        await worker.nc.close()


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("publish", f"$KV.{subjects.POLICY_BUCKET}.{subjects.POLICY_KEY}"),  # the policy
        ("subscribe", subjects.cloud_generate(MODEL)),  # every request, outside the queue group
        ("subscribe", "_INBOX.edge-a.>"),  # an edge's inbox
        ("publish", subjects.node_load("edge-a")),  # an edge's heartbeats
    ],
)
async def test_a_worker_is_refused_what_it_does_not_need(
    hub: EmbeddedNats, mesh_dir: MeshDir, action: str, subject: str
) -> None:
    worker = await _node(hub, mesh_dir, "w1")
    try:
        if action == "publish":
            await worker.nc.publish(subject, b"x")
        else:
            await worker.nc.subscribe(subject)
        await worker.nc.flush()
        assert await worker.refused(subject), f"{action} {subject} was not refused"
    finally:
        await worker.nc.close()


async def test_the_operator_writes_the_policy_and_edges_follow_it(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    operator, edge = await _node(hub, mesh_dir, "operator"), await _node(hub, mesh_dir, "edge-a")
    try:
        written = await PolicyStore.open(operator.nc)  # creates the bucket on first use
        current = await written.current()
        first = await written.set(
            POLICY, expect_revision=current.revision if current else 0, author="t"
        )
        followed = await PolicyStore.open(edge.nc, create=False)
        assert (await followed.current()).revision == first  # type: ignore[union-attr]
        seen: list[int] = []

        async def watch() -> None:
            async for stored in followed.watch():
                seen.append(stored.revision)
                if len(seen) == 2:
                    return

        watching = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        second = await written.set(POLICY_2, expect_revision=first, author="t")
        await asyncio.wait_for(watching, 5)
        assert seen == [first, second]
        assert len(await written.history()) >= 2
        with pytest.raises(Exception):  # noqa: B017  # an edge may read, never write
            await followed.set(POLICY, expect_revision=second, author="edge")
        assert await edge.refused(f"$KV.{subjects.POLICY_BUCKET}")
        assert not operator.refusals
    finally:
        await operator.nc.close()
        await edge.nc.close()


async def test_nodes_are_added_and_revoked_without_restarting_the_hub(
    hub: EmbeddedNats, mesh_dir: MeshDir
) -> None:
    pid = hub.pid
    mesh_dir.add("edge-new", "edge")
    assert mesh_dir.reload_hub()
    deadline = time.monotonic() + 5
    while True:  # the reload takes effect within moments
        try:
            newcomer = await _node(hub, mesh_dir, "edge-new")
            break
        except MeshUnavailableError:
            assert time.monotonic() < deadline, "the added edge was never admitted"
            await asyncio.sleep(0.1)
    seed = mesh_dir.creds("edge-new").read_bytes()
    mesh_dir.revoke("edge-new")
    assert mesh_dir.reload_hub()
    started = time.monotonic()
    while newcomer.nc.is_connected and time.monotonic() - started < 5:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    cut_after = time.monotonic() - started
    await newcomer.nc.close()
    assert cut_after < 5, "the revoked edge kept its connection"
    kept = mesh_dir.root / "kept.nk"  # the revoked seed, kept by an attacker
    kept.write_bytes(seed)
    with pytest.raises(MeshUnavailableError, match=r"(?i)authorization"):
        await connect(hub.url, name="again", credentials=MeshCredentials(kept))
    assert hub.pid == pid  # one hub process throughout


async def test_tandem_up_keeps_its_identities_and_refuses_anonymous_clients(
    tmp_path: Path,
) -> None:
    from tandem.up import EDGE_ID, WORKER_ID, edge_role, local_mesh

    first = {n.name: n.public_key for n in local_mesh(tmp_path).nodes()}
    assert set(first) == {"operator", EDGE_ID, WORKER_ID}
    (tmp_path / "users.conf").write_text("users = []\n")  # as an older version left it
    again = local_mesh(tmp_path)  # the next tandem up: the same identities
    assert {n.name: n.public_key for n in again.nodes()} == first
    # ... with the permissions this version needs (the operator reads planners' decisions)
    assert subjects.all_planner_decisions() in again.users_conf.read_text()
    argv = edge_role("127.0.0.1", 8080, "nats://x", MODEL, mesh=again).argv
    assert argv[argv.index("--nats-creds") + 1] == str(again.creds(EDGE_ID))
    # `tandem up --model X`: the same edge key, its grants now naming X's subjects.
    other = local_mesh(tmp_path, "other-pair")
    assert {n.name: n.public_key for n in other.nodes()} == first
    assert [n.models for n in other.nodes() if n.name == EDGE_ID] == [("other-pair",)]
    assert "tandem.v1.cloud.other-pair.generate" in other.users_conf.read_text()
    with EmbeddedNats(config=again.auth_conf) as hub:
        with pytest.raises(MeshUnavailableError, match=r"(?i)authorization"):
            await connect(hub.url, name="anonymous")
        edge = await connect(
            hub.url, name=EDGE_ID, credentials=MeshCredentials(again.creds(EDGE_ID))
        )
        await edge.close()


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    mesh = MeshDir(tmp_path_factory.mktemp("tls-mesh"))
    mesh.init(tls_hosts=["127.0.0.1", "localhost"])
    mesh.add("edge-a", "edge")
    return mesh


async def test_a_tls_hub_admits_nodes_that_trust_its_ca_only(
    tls_mesh: MeshDir, tmp_path: Path
) -> None:
    creds = tls_mesh.creds("edge-a")
    with EmbeddedNats(config=tls_mesh.auth_conf) as hub:
        trusted = await connect(
            hub.url, name="edge-a", credentials=MeshCredentials(creds, tls_mesh.tls_ca)
        )
        assert trusted.connected_url is not None and trusted.is_connected
        await trusted.close()
        other = MeshDir(tmp_path / "other")
        other.init(tls_hosts=["127.0.0.1"])  # another CA: the hub is a stranger
        # Without the CA (nats-py then checks the system's CAs) or with another one, the
        # connect fails within its bound, naming the cause.
        for ca in (None, other.tls_ca):
            with pytest.raises(MeshUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await connect(
                    hub.url, name="edge-a", credentials=MeshCredentials(creds, ca),
                    connect_timeout=1,
                )  # fmt: skip


async def test_a_hub_runs_tls_with_the_operators_own_files(tmp_path: Path) -> None:
    """``tandem mesh init --tls-ca/--tls-cert/--tls-key``: the operator's PKI (made here
    with mesh.tls in another directory, as any CA would), copied into the mesh, serves
    TLS; nodes trusting that CA connect, bundles carry it; bad files are refused first."""
    from mesh.tls import issue_cert, write_dev_ca

    pki = write_dev_ca(tmp_path / "pki", ["127.0.0.1"])  # "their" CA, not the mesh's
    own = issue_cert(tmp_path / "pki", "ours", ["127.0.0.1", "localhost"])
    wrong_key = issue_cert(tmp_path / "pki", "other", ["127.0.0.1"]).key
    for files, message in (
        ((pki.ca, own.cert, tmp_path / "missing.pem"), "cannot read the key"),
        ((pki.ca, own.cert, own.cert), "not usable PEM"),
        ((pki.ca, own.cert, wrong_key), "is not the key of the certificate"),
    ):
        with pytest.raises(MeshConfigError, match=message):
            MeshDir(tmp_path / f"bad-{len(message)}").init(tls_files=files)
    from typer.testing import CliRunner

    from tandem.cli import app

    runner = CliRunner()
    half = runner.invoke(app, ["mesh", "init", str(tmp_path / "half"), "--tls-ca", str(pki.ca)])
    assert half.exit_code == 1 and "together" in half.output
    result = runner.invoke(app, [
        "mesh", "init", str(tmp_path / "mesh"), "--tls-host", "127.0.0.1", "--tls-ca",
        str(pki.ca), "--tls-cert", str(own.cert), "--tls-key", str(own.key),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--nats-tls-ca" in result.output
    mesh = MeshDir(tmp_path / "mesh")
    assert mesh.tls_ca.read_bytes() == pki.ca.read_bytes()
    assert (mesh.tls_ca.parent / "hub-key.pem").stat().st_mode & 0o777 == 0o600
    assert mesh.client_url().startswith("tls://")
    mesh.add("edge-a", "edge")
    with EmbeddedNats(config=mesh.auth_conf) as hub:
        edge = await connect(
            hub.url, name="edge-a", credentials=MeshCredentials(mesh.creds("edge-a"), pki.ca)
        )
        assert edge.is_connected
        await edge.close()


async def test_a_hub_whose_certificate_expired_is_refused_naming_the_cause(
    tmp_path: Path,
) -> None:
    from mesh.tls import issue_cert

    mesh = MeshDir(tmp_path)
    mesh.init(tls_hosts=["127.0.0.1", "localhost"])
    mesh.add("edge-a", "edge")
    # The hub's certificate, re-issued by the same CA, expired yesterday.
    issue_cert(mesh.tls_ca.parent, "hub", ["127.0.0.1", "localhost"], valid_days=-1)
    creds = MeshCredentials(mesh.creds("edge-a"), mesh.tls_ca)
    with EmbeddedNats(config=mesh.auth_conf) as hub:
        with pytest.raises(MeshUnavailableError, match="certificate has expired"):
            await connect(hub.url, name="edge-a", credentials=creds, connect_timeout=1)
        # Renewed (tandem mesh issue-cert's way: the same files) and reloaded, it is
        # trusted again with no restart of the hub.
        issue_cert(mesh.tls_ca.parent, "hub", ["127.0.0.1", "localhost"])
        assert mesh.reload_hub()
        deadline = time.monotonic() + 5
        while True:
            try:
                edge = await connect(hub.url, name="edge-a", credentials=creds, connect_timeout=1)
                break
            except MeshUnavailableError:
                assert time.monotonic() < deadline, "the renewed certificate was never served"
                await asyncio.sleep(0.1)
        assert edge.is_connected
        await edge.close()
