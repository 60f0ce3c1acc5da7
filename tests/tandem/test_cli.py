"""The ``tandem`` CLI: every command has help, versions print, user errors are one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.cli import app

COMMANDS = [
    [],
    ["up"],
    ["status"],
    ["version"],
    ["edge"],
    ["edge", "serve"],
    ["cloud"],
    ["cloud", "serve"],
    ["models"],
    ["models", "list"],
    ["models", "prepare"],
    ["models", "check"],
    ["bench"],
    ["bench", "run"],
    ["router"],
    ["router", "train"],
    ["policy"],
    *[["policy", c] for c in ("show", "get", "set", "edit", "validate", "diff", "history")],
    *[["policy", c] for c in ("rollback", "explain")],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tandem")
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert len(result.output.splitlines()) > 3


def test_version_prints_the_installed_version() -> None:
    from mesh.version import __version__

    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_invalid_setting_is_one_clear_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "edge", "serve", "--n-ctx", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: invalid setting n_ctx")
    assert "Traceback" not in proc.stderr


def test_status_without_a_mesh_fails_clearly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "status", "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr


@contextmanager
def _beating(url: str, creds: Path, node_id: str, role: str = "edge") -> Iterator[None]:
    """A node's heartbeats, under its own identity, from a thread of its own (the CLI
    runs its own event loop); a cloud worker's report 1.5 engine-busy seconds."""
    from mesh import subjects
    from mesh.connection import MeshCredentials, connect
    from mesh.protocol import NodeHeartbeat, NodeLoad
    from models.catalog import DEFAULT_PAIR

    stop, started = threading.Event(), threading.Event()
    load = NodeLoad(
        running=0, waiting=0, kv_cache_usage=0.0, tokens_per_s=0.0, engine_busy_s=1.5
    )  # fmt: skip
    beat = NodeHeartbeat.model_validate(
        {"node_id": node_id, "role": role, "model": DEFAULT_PAIR, "version": "0", "load": load}
    )

    async def beats() -> None:
        nc = await connect(url, name=node_id, credentials=MeshCredentials(creds))
        try:
            while not stop.is_set():
                await nc.publish(subjects.node_load(node_id), beat.to_bytes())
                await nc.flush()
                started.set()
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    thread = threading.Thread(target=lambda: asyncio.run(beats()), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the edge never beat"
        yield
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.timeout(120)
def test_status_and_policy_on_a_secured_local_mesh_need_no_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tandem up``'s mesh in TANDEM_HOME refuses anonymous clients; ``tandem status``
    and ``tandem policy`` given no identity use its operator's (operator_credentials)."""
    from mesh.server import EmbeddedNats
    from tandem.up import EDGE_ID, local_mesh

    mesh = local_mesh(tmp_path / "mesh")  # what tandem up keeps in TANDEM_HOME
    for name in ("TANDEM_NATS_CREDS", "TANDEM_NATS_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich's tables: one row per node
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules: [{name: stay-home, route: edge}]\n")
    runner = CliRunner()
    with EmbeddedNats(config=mesh.auth_conf) as hub:
        monkeypatch.setenv("TANDEM_NATS_URL", hub.url)
        monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "elsewhere"))  # no identity there
        anonymous = runner.invoke(app, ["status"])
        assert anonymous.exit_code == 1
        assert "authorization violation" in anonymous.output.lower()
        monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
        with _beating(hub.url, mesh.creds(EDGE_ID), EDGE_ID):
            status = runner.invoke(app, ["status"])
        assert status.exit_code == 0, status.output
        assert EDGE_ID in status.output
        written = runner.invoke(app, ["policy", "set", "-f", str(policy), "--wait-s", "0"])
        assert written.exit_code == 0, written.output
        shown = runner.invoke(app, ["policy", "show"])
        assert shown.exit_code == 0, shown.output
        assert "revision 1" in shown.output and "stay-home" in shown.output


@pytest.mark.timeout(60)
async def test_the_bench_hears_a_secured_mesh_with_an_identity_only(tmp_path: Path) -> None:
    """``tandem bench run --nats-url``'s meter of cloud engine time (EngineMeter): refused
    anonymously by a secured mesh (the time is unknown, the run goes on), heard as the
    operator."""
    import httpx

    from mesh.connection import MeshCredentials
    from mesh.server import EmbeddedNats
    from models.catalog import DEFAULT_PAIR
    from tandem.bench.runner import EngineMeter, Target
    from tandem.up import WORKER_ID, local_mesh

    mesh = local_mesh(tmp_path / "mesh")
    operator = MeshCredentials(mesh.creds("operator"))
    with (
        EmbeddedNats(config=mesh.auth_conf) as hub,
        _beating(hub.url, mesh.creds(WORKER_ID), WORKER_ID, role="cloud"),
    ):
        async with httpx.AsyncClient() as http:
            heard = []
            for credentials in (None, operator):
                target = Target(
                    base_url="http://127.0.0.1:1", model=DEFAULT_PAIR, nats_url=hub.url,
                    nats_credentials=credentials,
                )  # fmt: skip
                meter = EngineMeter(target, http)
                await meter.start()
                try:
                    heard.append((await meter.read())[1])
                finally:
                    await meter.close()
    assert heard == [None, {WORKER_ID: 1.5}]


def _unset_bench_args() -> dict[str, object]:
    import inspect

    from tandem.commands.bench import run

    return {name: None for name in inspect.signature(run).parameters}


def test_given_keeps_only_the_options_the_user_set() -> None:
    from tandem.commands.common import given

    assert given({"port": 9000, "host": None, "slots": 0, "api_key": ""}) == {
        "port": 9000,
        "slots": 0,
        "api_key": "",
    }


def test_bench_run_without_options_takes_every_library_default() -> None:
    from tandem.bench.harness import BenchOptions
    from tandem.commands.bench import bench_options

    assert bench_options(_unset_bench_args()) == BenchOptions()


def test_bench_run_passes_on_only_the_options_given() -> None:
    from tandem.bench.cost import CostModel
    from tandem.bench.harness import BenchOptions
    from tandem.bench.runner import RunPlan
    from tandem.commands.bench import bench_options

    args = _unset_bench_args() | {
        "modes": "edge, cloud",
        "concurrency": "1,4",
        "rate": 1.5,
        "synthetic_steps": 9,
        "cloud_usd_per_hour": 0.5,
        "model": "my-pair",
        "nats_url": "",
    }
    options = bench_options(args)
    defaults = BenchOptions()
    assert options.plan == RunPlan(modes=["edge", "cloud"], concurrency=[1, 4], rate_per_s=1.5)
    assert options.synthetic.steps == 9
    assert options.synthetic.think_time_s == defaults.synthetic.think_time_s
    assert options.cost == CostModel(cloud_usd_per_engine_hour=0.5)
    assert (options.model, options.layout.model) == ("my-pair", "my-pair")
    assert options.layout.edge_cores == defaults.layout.edge_cores
    assert options.nats_url is None  # '' skips reading cloud engine time
    assert (options.sessions, options.base_url) == (defaults.sessions, defaults.base_url)


def _tandem_at(home: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``tandem COMMAND`` in a subprocess with ``TANDEM_HOME=home``."""
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *command],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TANDEM_HOME": str(home)},
    )  # fmt: skip


@pytest.mark.parametrize("command", [["models", "prepare"], ["up"]], ids=["prepare", "up"])
def test_an_unwritable_tandem_home_is_one_line_naming_the_path(
    command: list[str], tmp_path: Path
) -> None:
    """Found trying issue 17's start-up faults: both printed a stack from ``mkdir``."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    home = a_file / "home"  # a path under a file: not writable, even for root
    done = _tandem_at(home, command)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: Not a directory" in done.stderr and f"TANDEM_HOME is {home}" in done.stderr


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, filled: a disk with no space left (needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "fill").write_bytes(b"\0" * 65536)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("command", [["models", "prepare"], ["up"]], ids=["prepare", "up"])
def test_a_full_disk_under_tandem_home_is_one_line_saying_so(
    command: list[str], full_disk: Path
) -> None:
    """A full disk fails a write, which names no file: the message says where to look."""
    home = full_disk / "home"
    done = _tandem_at(home, command)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "No space left on device" in done.stderr, done.stderr
    assert f"a disk is full; TANDEM_HOME is {home}" in done.stderr, done.stderr
