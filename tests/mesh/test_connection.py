"""Connecting to NATS: failing fast, connecting later in the background, auth errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from mesh.connection import connect, connect_in_background
from mesh.errors import MeshUnavailableError
from mesh.server import EmbeddedNats, free_port
from tests.mesh.helpers import eventually

pytestmark = pytest.mark.timeout(60)

_AUTH_CONFIG = """
authorization {
  users = [
    {
      user: "edge"
      password: "edge-pw"
      permissions: {
        publish: { allow: ["allowed.>"] }
        subscribe: { allow: ["allowed.>", "_INBOX.>"] }
      }
    }
  ]
}
"""


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server that admits only user ``edge``, who may publish only to ``allowed.>``."""
    config = tmp_path / "auth.conf"
    config.write_text(_AUTH_CONFIG)
    with EmbeddedNats(config=config, store_dir=tmp_path / "store") as server:
        yield server


async def test_connect_without_a_server_raises_mesh_unavailable() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(MeshUnavailableError) as info:
        await connect(url, name="nobody-home")
    assert url in str(info.value)


async def test_connect_with_wrong_password_fails_instead_of_retrying(
    auth_nats: EmbeddedNats,
) -> None:
    with pytest.raises(MeshUnavailableError) as info:
        await connect(auth_nats.url, name="intruder", user="edge", password="wrong")
    assert "Authorization" in str(info.value)


async def test_permission_violation_is_logged_at_error(
    auth_nats: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="mesh.connection")
    nc = await connect(auth_nats.url, name="edge", user="edge", password="edge-pw")
    try:
        await nc.publish("forbidden.subject", b"x")
        await nc.flush(timeout=5)
        await eventually(
            lambda: any("permissions violation" in r.getMessage().lower() for r in caplog.records)
        )
        # The connection survives a refused publish.
        sub = await nc.subscribe("allowed.echo")
        await nc.publish("allowed.echo", b"ok")
        assert (await sub.next_msg(timeout=5)).data == b"ok"
    finally:
        await nc.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("forbidden.subject" in r.getMessage() for r in errors)


async def test_wait_connected_times_out_while_nats_is_away() -> None:
    link = await connect_in_background(f"nats://127.0.0.1:{free_port()}", name="lonely")
    try:
        with pytest.raises(MeshUnavailableError):
            await link.wait_connected(timeout_s=0.3)
        assert link.nc is None
        assert not link.connected
    finally:
        await link.close()


async def test_connect_in_background_connects_once_a_server_appears(tmp_path: Path) -> None:
    port = free_port()
    connected_to: list[Client] = []
    link = await connect_in_background(
        f"nats://127.0.0.1:{port}",
        name="patient",
        on_connect=connected_to.append,
        retry_interval_s=0.2,
    )
    server = EmbeddedNats(port=port, store_dir=tmp_path / "store")
    try:
        await asyncio.sleep(0.5)
        assert not link.connected
        await asyncio.to_thread(server.start)
        nc = await link.wait_connected(timeout_s=15)
        assert link.connected
        assert connected_to == [nc]
        sub = await nc.subscribe("test.link.echo")
        await nc.publish("test.link.echo", b"late hello")
        assert (await sub.next_msg(timeout=5)).data == b"late hello"
    finally:
        await link.close()
        server.stop()
    assert link.nc is None


async def test_async_on_connect_runs_before_wait_connected_returns(
    nats_server: EmbeddedNats,
) -> None:
    subscribed = asyncio.Event()

    async def on_connect(nc: Client) -> None:
        await nc.subscribe("test.link.ready")
        subscribed.set()

    link = await connect_in_background(nats_server.url, name="eager", on_connect=on_connect)
    try:
        await link.wait_connected(timeout_s=10)
        assert subscribed.is_set()
    finally:
        await link.close()
