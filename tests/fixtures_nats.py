"""Real-NATS fixtures to share: ``from tests.fixtures_nats import nats_server`` in a conftest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.security import MeshDir, Role
from mesh.server import EmbeddedNats


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on free ports and a temp store, for the session."""
    with EmbeddedNats() as server:
        yield server


def mesh_with(root: Path, identities: dict[str, Role]) -> MeshDir:
    """A hub configuration (``tandem mesh init``) admitting ``identities`` (name: role)."""
    mesh = MeshDir(root)
    mesh.init()
    for name, role in identities.items():
        mesh.add(name, role)
    return mesh
