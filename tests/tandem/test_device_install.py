"""``tandem edge install``: a device's units and leaf config from its bundle, checked for real.

The units pass ``systemd-analyze verify``; the leaf config passes ``nats-server -t`` and
is booted as a leaf of a real TLS hub rendered by ``tandem mesh``, where the installed
identity reaches a worker and the policy bucket. Bad bundles and prefixes fail with one
line and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from typer.testing import CliRunner

from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.security import MeshDir
from mesh.server import EmbeddedNats, find_nats_server, free_port
from router.store import PolicyStore
from tandem.cli import app

MODEL = "smollm2-135m"
UNITS = ("tandem-edge.service", "tandem-nats-leaf.service")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    mesh = MeshDir(tmp_path_factory.mktemp("hub"))
    mesh.init(leaf_port=free_port(), tls_hosts=["127.0.0.1", "localhost"])
    for name, role in (("operator", "operator"), ("kitchen", "edge"), ("w1", "worker")):
        mesh.add(name, role)  # type: ignore[arg-type]
    return mesh


def _install(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["edge", "install", *map(str, args)])
    return result.exit_code, result.output


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(mesh: MeshDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("device")
    code, output = _install("--bundle", mesh.bundle("kitchen"), "--prefix", prefix)
    assert code == 0, output
    return prefix


def test_the_units_verify_and_the_secrets_are_private(installed: Path) -> None:
    units = [installed / "etc/systemd/system" / u for u in UNITS]
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True
    )
    ours = [line for line in done.stderr.splitlines() if "tandem" in line]
    assert done.returncode == 0 and not ours, done.stderr
    edge_unit = units[0].read_text()
    for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "StateDirectory=tandem-edge", "Restart=on-failure", "MemoryMax=4G",
                      "LoadCredential=nats.nk:"):  # fmt: skip
        assert hardening in edge_unit
    env = (installed / "etc/tandem/edge.env").read_text()
    assert "TANDEM_EDGE_NODE_ID=kitchen" in env and "nats://127.0.0.1:4222" in env
    for secret in ("kitchen.nk", "leaf.conf"):
        mode = stat.S_IMODE((installed / "etc/tandem" / secret).stat().st_mode)
        assert mode == 0o600, f"{secret} is {mode:o}"
    seed = (installed / "etc/tandem/kitchen.nk").read_text().strip()
    assert seed.startswith("SU") and seed not in env and seed not in edge_unit


def test_the_installed_leaf_joins_the_hub_and_carries_the_edge(
    mesh: MeshDir, installed: Path
) -> None:
    leaf_conf = installed / "etc/tandem/leaf.conf"
    checked = subprocess.run(
        [str(find_nats_server()), "-c", str(leaf_conf), "-t"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert str(installed / "etc/tandem/ca.pem") in leaf_conf.read_text()  # the device's CA

    async def through_the_leaf(hub: EmbeddedNats, leaf: EmbeddedNats) -> None:
        ca = mesh.tls_ca
        worker = await connect(
            hub.url, name="w1", credentials=MeshCredentials(mesh.creds("w1"), ca)
        )
        operator = await connect(
            hub.url, name="operator", credentials=MeshCredentials(mesh.creds("operator"), ca)
        )
        edge = await connect(
            leaf.url, name="kitchen",
            credentials=MeshCredentials(installed / "etc/tandem/kitchen.nk"),
        )  # fmt: skip
        try:

            async def answer(msg: Msg) -> None:
                await msg.respond(b"from the hub: " + msg.data)

            await worker.subscribe(subjects.cloud_generate(MODEL), queue="q", cb=answer)
            await worker.flush()
            reply = None
            for _ in range(50):  # the leaf learns the worker's interest over the link
                try:
                    reply = await edge.request(subjects.cloud_generate(MODEL), b"hi", timeout=0.2)
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            assert reply is not None and reply.data == b"from the hub: hi"
            store = await PolicyStore.open(operator)
            await store.set("rules: [{name: local, route: edge}]\n", expect_revision=0)
            followed = await PolicyStore.open(edge, create=False)  # the hub's domain, via leaf
            current = await followed.current()
            assert current is not None and current.policy is not None
        finally:
            for nc in (worker, operator, edge):
                await nc.close()

    with EmbeddedNats(config=mesh.server_conf, jetstream=False) as hub:
        with EmbeddedNats(config=leaf_conf, jetstream=False) as leaf:
            asyncio.run(through_the_leaf(hub, leaf))


def test_dry_run_prints_the_units_and_no_secret(mesh: MeshDir, tmp_path: Path) -> None:
    code, output = _install("--bundle", mesh.bundle("kitchen"), "--prefix", tmp_path, "--dry-run")
    assert code == 0, output
    assert "[Service]" in output and "tandem-edge" in output
    seed = json.loads(mesh.bundle("kitchen").read_text())["seed"]
    assert seed not in output and "(secret: not printed)" in output
    assert not any(tmp_path.iterdir())


def test_bad_bundles_and_prefixes_fail_in_one_line_and_write_nothing(
    mesh: MeshDir, installed: Path, tmp_path: Path
) -> None:
    not_json = tmp_path / "not.json"
    not_json.write_text("{oops")
    wrong_seed = tmp_path / "seed.json"
    data = json.loads(mesh.bundle("kitchen").read_text())
    wrong_seed.write_text(json.dumps({**data, "seed": "SUnotaseed"}))
    prefix = tmp_path / "device"
    cases = {
        tmp_path / "missing.json": "no bundle at",
        not_json: "not a Tandem edge bundle",
        wrong_seed: "damaged edge bundle: seed",
    }
    for bundle, message in cases.items():
        code, output = _install("--bundle", bundle, "--prefix", prefix)
        assert code == 1 and message in output and "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1
    assert not prefix.exists()

    other = MeshDir(tmp_path / "other-hub")  # a bundle for another hub, onto kitchen's install
    other.init()
    other.add("kitchen", "edge")
    before = _tree(installed)
    code, output = _install("--bundle", other.bundle("kitchen"), "--prefix", installed)
    assert code == 1 and "installed for mesh" in output and "--force" in output
    assert _tree(installed) == before

    blocked = tmp_path / "blocked"  # etc/tandem can be written, etc/systemd cannot
    (blocked / "etc").mkdir(parents=True)
    (blocked / "etc" / "systemd").write_text("a file where a directory must go")
    code, output = _install("--bundle", mesh.bundle("kitchen"), "--prefix", blocked)
    assert code == 1 and "cannot write under" in output, output
    assert not (blocked / "etc" / "tandem").exists() or not any(
        (blocked / "etc" / "tandem").iterdir()
    )


def test_the_unit_templates_are_in_deploy_systemd() -> None:
    root = Path(__file__).resolve().parents[2]
    for unit in UNITS:
        assert (root / "deploy" / "systemd" / f"{unit}.in").is_file()
    assert shutil.which("systemd-analyze")
