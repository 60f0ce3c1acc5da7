"""Fixtures shared by every test package: real NATS, a real edge daemon, the openai client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tandem.local import EdgeProcess
from tests.fixtures_nats import nats_server  # noqa: F401  (re-exported fixture)


@pytest.fixture(scope="session")
def edge() -> Iterator[EdgeProcess]:
    """One edge daemon (real llama.cpp, default model) for the whole test session."""
    with EdgeProcess(slots=1, max_queue=64) as proc:
        yield proc
