"""Fixtures of the mesh tests: clients of the session server, and private servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from mesh.connection import connect
from mesh.server import EmbeddedNats

# ``nats_server`` (one real server per test session) comes from tests/fixtures_nats.py
# through the root conftest; importing it here too would start a second one.


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A client of the session server, closed after the test."""
    client = await connect(nats_server.url, name="test-client")
    yield client
    await client.close()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of this test alone, free to be stopped and restarted."""
    server = EmbeddedNats(store_dir=tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()
