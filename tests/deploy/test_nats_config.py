"""The NATS configuration the cluster runs, booted for real (``nats-server -t`` only parses;
cross-option checks run at start).

The ConfigMap's text is kept as rendered except for what only exists in a pod, each
replaced with a local equivalent: the mounted paths (store, pid file, the hub's TLS
files), the listen addresses (free loopback ports) and the routes to the other pods'
DNS names (the other local servers). ``users.conf``, the Secret's content, is a real
``MeshDir`` rendering, so the nodes connect with the credentials ``tandem mesh`` made.
Three servers form the cluster, as the StatefulSet's three pods do.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.errors import MeshUnavailableError
from mesh.security import MeshDir
from mesh.server import EmbeddedNats, find_nats_server, free_port
from router.store import PolicyStore
from tandem.cli import app
from tests.deploy.manifests import K8S, Obj, named, pod_spec, render, requires_kubectl

pytestmark = [requires_kubectl, pytest.mark.timeout(90)]

_PODS = 3
_ROUTE = "nats://tandem-nats-{i}.tandem-nats-headless:6222"
_WAIT_S = 10.0


@dataclass
class LocalNode:
    """One local stand-in for a tandem-nats pod."""

    name: str
    conf_dir: Path
    client: int
    monitor: int
    cluster: int
    leaf: int


def _swap(text: str, old: str, new: str) -> str:
    """Replace ``old`` (it must be there: a renamed path fails here, not silently)."""
    assert text.count(old) == 1, f"{old!r} appears {text.count(old)} times in the config"
    return text.replace(old, new)


def _localize(data: dict[str, str], node: LocalNode, peers: list[LocalNode], mesh: MeshDir) -> None:
    store = node.conf_dir / "jetstream"
    conf = data["nats.conf"]
    conf = _swap(conf, '"/data/jetstream"', json.dumps(str(store)))
    conf = _swap(conf, '"/var/run/nats/nats.pid"', json.dumps(str(node.conf_dir / "nats.pid")))
    conf = _swap(conf, '"0.0.0.0:4222"', f'"127.0.0.1:{node.client}"')
    conf = _swap(conf, '"0.0.0.0:8222"', f'"127.0.0.1:{node.monitor}"')
    conf = _swap(conf, '"0.0.0.0:6222"', f'"127.0.0.1:{node.cluster}"')
    for i, peer in enumerate(peers):
        conf = _swap(conf, _ROUTE.format(i=i), f"nats://127.0.0.1:{peer.cluster}")
    leaf = _swap(data["leafnodes.conf"], '"0.0.0.0:7422"', f'"127.0.0.1:{node.leaf}"')
    if "tls {" in leaf:
        tls = mesh.tls_ca.parent
        leaf = _swap(leaf, '"/etc/nats-tls/tls.crt"', json.dumps(str(tls / "hub.pem")))
        leaf = _swap(leaf, '"/etc/nats-tls/tls.key"', json.dumps(str(tls / "hub-key.pem")))
    node.conf_dir.mkdir(parents=True)
    (node.conf_dir / "nats.conf").write_text(conf)
    (node.conf_dir / "leafnodes.conf").write_text(leaf)
    # The Secret tandem-nats-users: what `tandem mesh init/add-*` render.
    (node.conf_dir / "users.conf").write_text(mesh.users_conf.read_text())
    (node.conf_dir / "system.conf").write_text(mesh.system_conf.read_text())


def _config_map(objects: list[Obj]) -> dict[str, str]:
    return dict(named(objects, "ConfigMap", "tandem-nats-config")["data"])


class LocalCluster:
    """Three nats-servers running the rendered config, started together (a JetStream
    cluster is healthy only once its peers elected a leader)."""

    def __init__(self, root: Path, data: dict[str, str], mesh: MeshDir) -> None:
        self.nodes = [
            LocalNode(f"tandem-nats-{i}", root / f"tandem-nats-{i}",
                      free_port(), free_port(), free_port(), free_port())
            for i in range(_PODS)
        ]  # fmt: skip
        for node in self.nodes:
            _localize(data, node, self.nodes, mesh)
        self.servers = [
            EmbeddedNats(
                port=n.client, monitor_port=n.monitor, config=n.conf_dir / "nats.conf",
                store_dir=n.conf_dir / "jetstream", jetstream=False,
            )
            for n in self.nodes
        ]  # fmt: skip

    def start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # $SERVER_NAME comes from the pod's name (the StatefulSet's env); each server is
        # a child process that reads it at start, so start them one after another but
        # wait for health together.
        procs = []
        for node, server in zip(self.nodes, self.servers, strict=True):
            monkeypatch.setenv("SERVER_NAME", node.name)
            binary = find_nats_server()
            server._store_dir = server._make_store_dir()
            server._choose_ports()
            server._launch(binary)
            procs.append(server)
        with ThreadPoolExecutor(_PODS) as pool:
            list(pool.map(lambda s: s._wait_healthy(), procs))

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def varz(self, i: int, path: str = "/varz") -> dict[str, Any]:
        url = f"{self.servers[i].monitor_url}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return dict(json.load(resp))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    """The operator's mesh directory: the hub's dev CA (for the hybrid leaf port), an
    operator (init), a worker named as the StatefulSet's first pod, an edge."""
    root = tmp_path_factory.mktemp("mesh")
    mesh = MeshDir(root)
    mesh.init(tls_hosts=["localhost"])
    mesh.add("operator", "operator")  # as `tandem mesh init` does
    mesh.add("tandem-worker-0", "worker")
    return mesh


@pytest.fixture(scope="module")
def objects() -> dict[str, list[Obj]]:
    return {o: render(K8S / "overlays" / o) for o in ("monolithic", "hybrid")}


@pytest.fixture(scope="module")
def hybrid_cluster(
    objects: dict[str, list[Obj]], mesh: MeshDir, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), _config_map(objects["hybrid"]), mesh)
    with pytest.MonkeyPatch.context() as patch:
        try:
            cluster.start(patch)
            yield cluster
        finally:
            cluster.stop()


@pytest.mark.parametrize("overlay", ["monolithic", "hybrid"])
def test_rendered_config_parses(
    objects: dict[str, list[Obj]], mesh: MeshDir, tmp_path: Path, overlay: str
) -> None:
    nodes = [LocalNode(f"tandem-nats-{i}", tmp_path / str(i), 4222, 8222, 6222 + i, 7422)
             for i in range(_PODS)]  # fmt: skip
    _localize(_config_map(objects[overlay]), nodes[0], nodes, mesh)
    done = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(nodes[0].conf_dir / "nats.conf")],
        capture_output=True, text=True, timeout=30, env={"SERVER_NAME": "tandem-nats-0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "configuration file" in done.stderr and "is valid" in done.stderr


def test_rendered_cluster_boots_as_one_jetstream_cluster(hybrid_cluster: LocalCluster) -> None:
    for i in range(_PODS):
        varz = hybrid_cluster.varz(i)
        assert varz["server_name"] == f"tandem-nats-{i}"  # from $SERVER_NAME
        assert varz["cluster"]["name"] == "tandem"
        routed = hybrid_cluster.varz(i, "/routez")["routes"]
        assert {r["remote_name"] for r in routed} == {
            f"tandem-nats-{j}" for j in range(_PODS) if j != i
        }
        jsz = hybrid_cluster.varz(i, "/jsz")
        assert jsz["config"]["domain"] == "hub"
        assert jsz["meta_cluster"]["cluster_size"] == _PODS


async def test_nodes_connect_with_their_mesh_credentials(
    hybrid_cluster: LocalCluster, mesh: MeshDir, tmp_path: Path
) -> None:
    urls = [s.url for s in hybrid_cluster.servers]
    worker = await connect(
        urls[0], name="tandem-worker-0",
        credentials=MeshCredentials(mesh.creds("tandem-worker-0"), None),
    )  # fmt: skip
    try:
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_probe(msg: Any) -> None:
            got.set_result(msg)

        sub = await worker.subscribe("_INBOX.tandem-worker-0.probe", cb=on_probe)
        await worker.publish("_INBOX.tandem-worker-0.probe", b"here")  # its grants work
        assert (await asyncio.wait_for(got, _WAIT_S)).data == b"here"
        await sub.unsubscribe()
    finally:
        await worker.close()
    stranger = MeshDir(tmp_path / "other")
    stranger.init()
    stranger.add("intruder", "worker")
    with pytest.raises(MeshUnavailableError, match=r"(?i)authorization"):
        await connect(
            urls[2], name="intruder", connect_timeout=0.5,
            credentials=MeshCredentials(stranger.creds("intruder"), None),
        )  # fmt: skip


def _job_command(objects: list[Obj]) -> tuple[list[str], dict[str, str]]:
    job = named(objects, "Job", "tandem-policy-load")
    (container,) = pod_spec(job)["containers"]
    environment = {e["name"]: e["value"] for e in container.get("env", [])}
    return list(container["args"]), environment


def test_the_policy_job_loads_the_configmap_into_the_cluster(
    hybrid_cluster: LocalCluster, objects: dict[str, list[Obj]], mesh: MeshDir, tmp_path: Path
) -> None:
    """The Job's command line as rendered, with its mounts made local: the ConfigMap's
    policy.yaml and the operator's seed (the Secret tandem-operator-seed)."""
    args, environment = _job_command(objects["hybrid"])
    policy = named(objects["hybrid"], "ConfigMap", "tandem-policy")["data"]["policy.yaml"]
    (tmp_path / "policy.yaml").write_text(policy)
    args = [a.replace("/policy/policy.yaml", str(tmp_path / "policy.yaml")) for a in args]
    args = [a.replace("nats://tandem-nats:4222", hybrid_cluster.servers[2].url) for a in args]
    seed = environment.pop("TANDEM_NATS_CREDS")
    assert Path(seed).name == "operator.nk"
    assert environment == {}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "/usr/bin:/bin", "TANDEM_NATS_CREDS": str(mesh.creds("operator")),
             "TANDEM_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "policy stored as revision" in done.stdout

    async def stored() -> tuple[str | None, int]:
        nc = await connect(
            hybrid_cluster.servers[0].url, name="operator",
            credentials=MeshCredentials(mesh.creds("operator"), None),
        )  # fmt: skip
        try:
            current = await (await PolicyStore.open(nc, create=False)).current()
            info = await nc.jetstream().stream_info(f"KV_{subjects.POLICY_BUCKET}")
            return (current.yaml_text if current else None), info.config.num_replicas or 1
        finally:
            await nc.close()

    # Replicated on all three servers (mesh.buckets): the policy outlives a pod's restart.
    assert asyncio.run(stored()) == (policy, 3)


def test_an_edge_leaf_attaches_over_tls(hybrid_cluster: LocalCluster, mesh: MeshDir) -> None:
    """A new edge, admitted the way docs/deploy.md says (`tandem mesh add-edge`, the
    Secret's users.conf updated, each pod told to reload), attaches its own nats-server
    to a pod's leaf port with the hub's TLS certificate (hybrid overlay)."""
    hub_leaf = f"nats-leaf://localhost:{hybrid_cluster.nodes[1].leaf}"
    mesh.add("edge-1", "edge", hub_url=hub_leaf, local_port=free_port())
    for node in hybrid_cluster.nodes:
        (node.conf_dir / "users.conf").write_text(mesh.users_conf.read_text())
        reload = f"reload={node.conf_dir / 'nats.pid'}"  # the pod's pid_file
        subprocess.run([str(find_nats_server()), "--signal", reload], check=True, timeout=10)
    with EmbeddedNats(config=mesh.leaf_conf("edge-1"), jetstream=False):
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            leafs = hybrid_cluster.varz(1, "/leafz")["leafs"]
            if leafs:
                break
            time.sleep(0.05)
        assert [leaf["name"] for leaf in leafs] == ["tandem-leaf-edge-1"]
        # Revoked as docs/deploy.md says: users.conf updated, each pod reloaded, then the
        # leaf link closed through the system account (a reload does not re-check it).
        mesh.revoke("edge-1")
        for node in hybrid_cluster.nodes:
            (node.conf_dir / "users.conf").write_text(mesh.users_conf.read_text())
            reload = f"reload={node.conf_dir / 'nats.pid'}"
            subprocess.run([str(find_nats_server()), "--signal", reload], check=True, timeout=10)
        cut = CliRunner().invoke(
            app,
            ["mesh", "cut-leaf", "edge-1", "--dir", str(mesh.root),
             "--hub-url", hybrid_cluster.servers[0].url],
        )  # fmt: skip
        assert cut.exit_code == 0 and "tandem-leaf-edge-1" in cut.output, cut.output
        deadline = time.monotonic() + _WAIT_S
        while hybrid_cluster.varz(1, "/leafz")["leafs"]:  # relinks are refused from now on
            assert time.monotonic() < deadline, "the revoked edge's leaf link stayed up"
            time.sleep(0.05)
