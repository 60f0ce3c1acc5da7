"""The local process supervisor with real processes: groups, the lifeline, stale reaping.

Children are ``sh``/``sleep``/tiny Python processes and one real nats-server;
a supervisor that must be SIGKILLed runs in a subprocess of its own. Every wait
polls against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.server import EmbeddedNats, free_port
from tandem.lifeline import group_members, process_start
from tandem.supervisor import AlreadyRunningError, ChildStartError, Supervisor

pytestmark = pytest.mark.timeout(60)

# A child with a grandchild in its group; the child dies on SIGTERM, the grandchild stays.
WITH_GRANDCHILD = ["sh", "-c", "sleep 300 & wait"]
# A child that ignores SIGTERM (a hung drain) and has a grandchild: only SIGKILL ends it.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, subprocess, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen(['sleep', '300'])\n"
    "time.sleep(300)\n",
]

# A supervisor in a process of its own, to be SIGKILLed: it starts both kinds of
# child and a guarded nats-server, then writes their pids to the file in argv[1].
SUPERVISOR_SCRIPT = """
import json, sys, time
from pathlib import Path
from tandem.local import local_nats
from tandem.supervisor import Supervisor

spec = json.loads(sys.argv[1])
run_dir = Path(spec["run_dir"]) if spec["run_dir"] else None
supervisor = Supervisor(run_dir=run_dir)
supervisor.open()
children = [
    supervisor.start(str(i), argv, grace_s=1.0) for i, argv in enumerate(spec["children"])
]
with local_nats(supervisor, port=spec["nats_port"], store_dir=Path(spec["nats_store"])) as nats:
    pids = {"groups": [c.pid for c in children] + [nats.pid], "lifeline": supervisor.lifeline_pid}
    Path(spec["out"] + ".tmp").write_text(json.dumps(pids))
    Path(spec["out"] + ".tmp").replace(spec["out"])
    time.sleep(300)
"""


def _eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _kill9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _KilledRun:
    """A supervisor subprocess and what it started, read from the file it writes."""

    def __init__(self, tmp_path: Path, run_dir: Path | None, children: list[list[str]]) -> None:
        self.nats_port = free_port()
        out = tmp_path / "pids.json"
        spec = {
            "run_dir": str(run_dir) if run_dir else None,
            "children": children,
            "nats_port": self.nats_port,
            "nats_store": str(tmp_path / "nats"),
            "out": str(out),
        }
        self.process = subprocess.Popen([sys.executable, "-c", SUPERVISOR_SCRIPT, json.dumps(spec)])
        _eventually(lambda: out.exists() or self.process.poll() is not None, 30, "started")
        assert self.process.poll() is None, "the supervisor subprocess failed"
        pids: dict[str, Any] = json.loads(out.read_text())
        self.groups: list[int] = pids["groups"]
        self.lifeline: int = pids["lifeline"]
        # Both grandchildren exist before anything is killed.
        _eventually(lambda: all(len(group_members(g)) == 2 for g in self.groups[:2]), 10, "forked")

    def kill9(self) -> None:
        """SIGKILL the supervisor process (and reap it: it is our child)."""
        self.process.kill()
        self.process.wait()

    def members(self) -> list[int]:
        """Every live process of the groups it started."""
        return [pid for group in self.groups for pid in group_members(group)]

    def cleanup(self) -> None:
        """Whatever the test left: kill it, so no test leaks a process."""
        _kill9(self.lifeline)
        for group in self.groups:
            for pid in group_members(group):
                _kill9(pid)
        if self.process.poll() is None:
            self.kill9()


@pytest.fixture
def killed_run(tmp_path: Path) -> Iterator[Callable[..., _KilledRun]]:
    runs: list[_KilledRun] = []

    def make(run_dir: Path | None = None) -> _KilledRun:
        runs.append(_KilledRun(tmp_path, run_dir, [WITH_GRANDCHILD, STUBBORN]))
        return runs[-1]

    yield make
    for run in runs:
        run.cleanup()


def test_stopping_the_supervisor_stops_every_child_and_grandchild() -> None:
    with Supervisor() as supervisor:
        polite = supervisor.start("polite", WITH_GRANDCHILD, grace_s=5.0)
        stubborn = supervisor.start("stubborn", STUBBORN, grace_s=0.5)
        _eventually(
            lambda: len(group_members(polite.pid)) == len(group_members(stubborn.pid)) == 2,
            10,
            "grandchildren forked",
        )
        everyone = group_members(polite.pid) + group_members(stubborn.pid)
    assert [pid for pid in everyone if _alive(pid)] == []
    assert polite.returncode == -signal.SIGTERM  # it drained on SIGTERM
    assert stubborn.returncode == -signal.SIGKILL  # it ignored SIGTERM: killed after its grace
    assert supervisor.lifeline_pid is None


def test_kill9_ends_the_whole_group_at_once_without_a_drain(tmp_path: Path) -> None:
    drained = tmp_path / "drained"
    # The shell would write the file if it got a SIGTERM (a drain) before dying.
    argv = ["sh", "-c", f"trap 'touch {drained}; exit 0' TERM; sleep 300 & wait"]
    with Supervisor() as supervisor:
        child = supervisor.start("crash", argv)
        _eventually(lambda: len(group_members(child.pid)) == 2, 10, "grandchild forked")
        child.kill9()
        assert child.returncode == -signal.SIGKILL
        assert group_members(child.pid) == []
    assert not drained.exists()


def test_a_child_that_exits_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    with Supervisor() as supervisor:
        child = supervisor.start(
            "broken", ["sh", "-c", "echo no config; exit 3"], log_path=tmp_path / "broken.log"
        )
        with pytest.raises(ChildStartError) as caught:
            child.wait_ready(lambda: False, timeout_s=10, poll_s=0.02)
    assert "broken exited with code 3" in str(caught.value)
    assert "no config" in str(caught.value)


def test_sigkill_of_the_supervisor_leaves_no_child_alive(
    killed_run: Callable[..., _KilledRun],
) -> None:
    run = killed_run()
    assert len(run.members()) == 5  # two children, two grandchildren, nats-server
    run.kill9()
    _eventually(lambda: run.members() == [], 10, "the lifeline ended every group")
    _eventually(lambda: not _alive(run.lifeline), 5, "the lifeline exited")


def test_a_stale_run_is_reaped_by_the_next_start(
    tmp_path: Path, killed_run: Callable[..., _KilledRun]
) -> None:
    run_dir = tmp_path / "run"
    run = killed_run(run_dir)
    # Lifeline and supervisor both gone (kill -9 of everything, say): the children stay.
    _kill9(run.lifeline)
    run.kill9()
    assert len(run.members()) == 5
    assert len(list(run_dir.glob("*.pid"))) == 3

    with Supervisor(run_dir=run_dir), EmbeddedNats(port=run.nats_port) as nats:
        assert run.members() == []
        assert nats.port == run.nats_port  # the stale server no longer holds the port
        assert list(run_dir.glob("*.pid")) == []


def test_a_pid_file_naming_an_unrelated_process_is_left_alone(
    tmp_path: Path, killed_run: Callable[..., _KilledRun]
) -> None:
    run_dir = tmp_path / "run"
    run = killed_run(run_dir)
    _kill9(run.lifeline)
    run.kill9()
    for pid in run.members():  # the stale processes are gone by now...
        _kill9(pid)
    _eventually(lambda: run.members() == [], 10, "stale processes killed")
    # ...and their pid was reused by an unrelated process: the record's start time is not its.
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (record_path,) = run_dir.glob("0.*.pid")  # the first child's
        record = json.loads(record_path.read_text())
        assert record["process"]["start"] != process_start(unrelated.pid)
        record["process"]["pid"] = unrelated.pid
        record_path.write_text(json.dumps(record))

        with Supervisor(run_dir=run_dir):
            assert unrelated.poll() is None
            assert not record_path.exists()
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_live_run_is_never_reaped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Supervisor(run_dir=run_dir) as first:
        child = first.start("sleeper", ["sleep", "300"])
        with pytest.raises(AlreadyRunningError):
            Supervisor(run_dir=run_dir).open()
        assert child.alive
    assert not child.alive
    assert list(run_dir.glob("*.pid")) == []
