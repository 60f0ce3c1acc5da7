"""Fixtures shared by every test package: real NATS, a real edge daemon, the openai client."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.local import EdgeProcess, WorkerProcess
from tests.fixtures_nats import nats_server  # noqa: F401  (re-exported fixture)

# Every vLLM worker the tests start (their children inherit the environment) runs
# without torch.compile: an engine starts in ~26 s instead of ~80 s here, and two
# compiling side by side took 130 s. Answers are compared engine to engine, so the
# tests hold either way; the compiled default is vLLM's own path (docs/benchmarks.md).
os.environ.setdefault("TANDEM_CLOUD_ENFORCE_EAGER", "true")


@pytest.fixture(scope="session")
def edge() -> Iterator[EdgeProcess]:
    """One edge daemon (real llama.cpp, default model) for the whole test session."""
    with EdgeProcess(slots=1, max_queue=64) as proc:
        yield proc


def _daemons(funcargs: dict[str, Any]) -> list[EdgeProcess | WorkerProcess]:
    found: list[EdgeProcess | WorkerProcess] = []
    for value in funcargs.values():
        values = value.values() if isinstance(value, dict) else [value]
        found += [v for v in values if isinstance(v, EdgeProcess | WorkerProcess)]
    return found


def _machine_state() -> str:
    """Load and pressure now: a test that fails on a starved machine says so."""
    lines = [f"load average {os.getloadavg()}"]
    for kind in ("cpu", "memory", "io"):
        pressure = Path(f"/proc/pressure/{kind}")
        if pressure.exists():
            lines.append(f"{kind} pressure: {pressure.read_text().splitlines()[0]}")
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """On a failure, attach the machine's load and the tail of each daemon's log the test
    used (edges, workers): CI shows only the failure section, and the daemon's side of a
    failure is otherwise lost with its temporary log."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    report.sections.append(("machine", _machine_state()))
    for daemon in _daemons(getattr(item, "funcargs", {})):
        try:
            tail = "\n".join(daemon.log().splitlines()[-40:])
        except OSError as exc:
            tail = f"(log unreadable: {exc})"
        alive = "alive" if daemon.child is not None and daemon.alive else "not running"
        report.sections.append((f"daemon {daemon.name} ({alive}), last 40 log lines", tail))
