"""Real-NATS fixtures to share: ``from tests.fixtures_nats import nats_server`` in a conftest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh.server import EmbeddedNats


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on free ports and a temp store, for the session."""
    with EmbeddedNats() as server:
        yield server
