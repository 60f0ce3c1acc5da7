"""``tandem planner config set/show`` and ``tandem status`` beside a running planner, as a
user runs them (the real CLI in a subprocess, a real nats-server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from pathlib import Path

import pytest

from cloud.planner import Planner
from mesh.connection import connect
from mesh.server import EmbeddedNats
from models.latency import LatencyProfile
from tests.cloud.test_planner_store import NoWorkers

pytestmark = pytest.mark.timeout(60)


async def _tandem(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tandem.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_config_set_refuses_a_bad_file_then_stores_and_shows_a_good_one(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    pool = f"cli-{uuid.uuid4().hex[:6]}"
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text("bounds: {max_replicas: 0}\n")
    good.write_text("# peak hours\nbounds: {min_replicas: 2, max_replicas: 6}\n")
    where = ("--pool", pool, "--nats-url", nats_server.url)
    code, out = await _tandem(tmp_path, "planner", "config", "set", "-f", str(bad), *where)
    assert code != 0 and "bounds.max_replicas" in out and "Traceback" not in out
    code, out = await _tandem(tmp_path, "planner", "config", "set", "-f", str(good), *where)
    assert code == 0 and f"pool {pool}: stored revision" in out
    code, out = await _tandem(tmp_path, "planner", "config", "show", *where)
    assert code == 0 and "valid" in out and "# peak hours" in out and "max_replicas: 6" in out


async def test_status_shows_the_planners_target_beside_the_fleet(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    pool = f"status-{uuid.uuid4().hex[:6]}"
    nc = await connect(nats_server.url, name="planner-cli-test")
    planner = Planner(nc, pool, NoWorkers(), profile=LatencyProfile.default().cloud)
    await planner.start()

    async def keep_deciding() -> None:
        while True:
            await planner.tick()
            await asyncio.sleep(0.2)  # the planner's own tick period, shortened

    ticking = asyncio.create_task(keep_deciding())
    try:
        code, out = await _tandem(
            tmp_path, "status", "--nats-url", nats_server.url, "--listen-s", "1.0"
        )
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        await planner.stop()
        await nc.close()
    assert code == 0, out
    assert "Planners" in out and pool in out
    row = next(line for line in out.splitlines() if pool in line)
    # No workers and a minimum of 1: the target is 1, and it keeps asking for it.
    assert "scale_up" in row and row.split("│")[5].strip() == "1"
