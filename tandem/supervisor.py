"""One supervisor for every local process Tandem starts: ``tandem up``, benches, test fixtures.

Example::

    with Supervisor(run_dir=tandem_home() / "run") as supervisor:
        edge = supervisor.start("edge", tandem_argv("edge", "serve"), log_path=Path("edge.log"))
        edge.wait_ready(lambda: answers("http://127.0.0.1:8080/health"), timeout_s=60)
        ...                                   # leaving the block stops it

**Process groups.** Each child runs in a session of its own, so its process group
holds it and everything it spawns (vLLM's engine core included), and a
terminal's Ctrl-C reaches only the supervisor, which then stops the children in
reverse start order (the edge before the workers and the NATS it uses).
Stopping a child sends SIGTERM to it (it drains), waits until its group is
empty, and SIGKILLs the whole group after the grace period, so no grandchild
outlives it.

**The lifeline.** Children must not outlive a supervisor that was SIGKILLed. The
supervisor starts one watcher process (``tandem.lifeline``) in a session of its
own, holding the only write end of a pipe the watcher reads; it tells the
watcher about every group it starts. When the supervisor dies, however it dies,
the kernel closes the pipe, and the watcher ends every group still alive
(SIGTERM to the leader, SIGKILL of the group after the grace period). We chose
this over Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) because
that signal fires when the *thread* that forked the child exits (a fixture
started from a worker thread would lose its processes when that thread ends),
it reaches only the direct child (vLLM's engine core, a grandchild, would be
orphaned unless every daemon killed its own group, which ``edge/`` and
``cloud/`` do not promise), it needs a ``preexec_fn`` (unsafe once the
supervisor has threads), and a signal cannot escalate: a child that hangs
draining would never get its SIGKILL. The watcher costs one small process per
supervisor. Left uncovered: the microseconds between a child's fork and its
registration, and a lifeline killed together with its supervisor; the pid
files below cover the latter.

**Stale reaping.** With ``run_dir`` (``tandem up`` uses ``$TANDEM_HOME/run``),
each process started or guarded is recorded in ``<name>.<pid>.pid``: its pid, its
start time and the boot it belongs to, and the same for the supervisor that
owns it. At open, a supervisor reaps what a dead supervisor left behind (a
nats-server still holding port 4222, say), but only a process whose pid *and*
start time still match its record, so a pid since reused by an unrelated
process is never touched; if the recorded owner is still alive, it refuses to
start (:class:`AlreadyRunningError`) rather than kill a live run's processes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tandem.lifeline import Group, boot_id, end_groups, process_start

logger = logging.getLogger(__name__)

_DEFAULT_GRACE_S = 15.0
_LIFELINE_STOP_S = 5.0
_LOG_TAIL_CHARS = 4000


class SupervisorError(Exception):
    """Base class of the supervisor's errors."""


class ChildStartError(SupervisorError):
    """A child exited, or did not become ready in time, while it started."""


class AlreadyRunningError(SupervisorError):
    """Another live supervisor owns the processes recorded in this run directory."""


def tandem_argv(*args: str) -> list[str]:
    """argv running a ``tandem`` sub-command with this interpreter."""
    return [sys.executable, "-m", "tandem.cli", *args]


@dataclass
class Child:
    """A process the supervisor started: the leader of its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    group: Group
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """Whether the child itself is still running."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: killed by that signal)."""
        return self.popen.poll()

    def log(self) -> str:
        """What the child logged so far (empty when it writes to the terminal)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(
        self, ready: Callable[[], bool], timeout_s: float, *, poll_s: float = 0.2
    ) -> None:
        """Block until ``ready()``; raise ChildStartError if the child exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not self.alive:
                raise ChildStartError(self._failure(f"exited with code {self.returncode}"))
            if time.monotonic() > deadline:
                raise ChildStartError(self._failure(f"not ready in {timeout_s:.0f} s"))
            time.sleep(poll_s)

    def terminate(self, grace_s: float | None = None) -> int:
        """SIGTERM (drain), SIGKILL of the whole group after the grace; return the exit code."""
        grace = self.group.grace_s if grace_s is None else grace_s
        end_groups([Group(self.group.pgid, self.group.leader_start, grace)])
        return self.popen.wait()

    def kill9(self) -> None:
        """SIGKILL the child and everything in its group at once (a crash, for failover tests)."""
        end_groups([self.group], drain=False)  # no SIGTERM first: a crash does not drain
        self.popen.wait()

    def _failure(self, what: str) -> str:
        where = f"; log {self.log_path}:\n{self.log()[-_LOG_TAIL_CHARS:]}" if self.log_path else ""
        return f"{self.name} {what}{where}"


class Supervisor:
    """Starts local processes in groups of their own, stops them all, leaves none behind."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self._run_dir = run_dir
        self._children: list[Child] = []
        self._records: list[Path] = []
        self._lifeline: subprocess.Popen[bytes] | None = None
        self._lifeline_pipe: IO[bytes] | None = None

    @property
    def children(self) -> list[Child]:
        """The children started so far, in start order."""
        return list(self._children)

    @property
    def lifeline_pid(self) -> int | None:
        """The watcher process's pid while the supervisor is open."""
        return self._lifeline.pid if self._lifeline else None

    def open(self) -> None:
        """Reap what a dead earlier run left in ``run_dir``, then start the lifeline."""
        if self._lifeline is not None:
            return
        if self._run_dir is not None:
            reap_stale(self._run_dir)
        read_end, write_end = os.pipe()
        try:
            self._lifeline = subprocess.Popen(
                [sys.executable, "-m", "tandem.lifeline"],
                stdin=read_end,
                # Own session: a terminal's Ctrl-C or a kill of our group spares the watcher.
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        # os.pipe() fds are not inheritable: no child but the watcher holds the pipe.
        self._lifeline_pipe = os.fdopen(write_end, "wb", buffering=0)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        grace_s: float = _DEFAULT_GRACE_S,
    ) -> Child:
        """Start ``argv`` as the leader of a new group; output goes to ``log_path`` or ours."""
        self.open()
        log = log_path.open("wb") if log_path is not None else None
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own copy
        child = Child(name, popen, self._register(name, popen.pid, grace_s), log_path)
        self._children.append(child)
        return child

    def guard(self, name: str, pid: int, *, grace_s: float = 5.0) -> None:
        """Cover a process started elsewhere in a session of its own (the embedded NATS).

        Its owner still stops it; the lifeline and the pid file only make sure it does
        not outlive this supervisor.
        """
        self.open()
        self._register(name, pid, grace_s)

    def stop(self, child: Child) -> int:
        """Stop one child (see ``Child.terminate``) and return its exit code."""
        return child.terminate()

    def stop_all(self) -> None:
        """Stop every child in reverse start order."""
        for child in reversed(self._children):
            self.stop(child)

    def close(self) -> None:
        """Stop every child, release the lifeline and remove this run's pid files."""
        self.stop_all()
        if self._lifeline_pipe is not None:
            self._lifeline_pipe.close()  # end of file: the watcher checks, finds nothing, exits
            self._lifeline_pipe = None
        if self._lifeline is not None:
            try:
                self._lifeline.wait(timeout=_LIFELINE_STOP_S)
            except subprocess.TimeoutExpired:
                self._lifeline.kill()
                self._lifeline.wait()
            self._lifeline = None
        for record in self._records:
            record.unlink(missing_ok=True)
        self._records.clear()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _register(self, name: str, pid: int, grace_s: float) -> Group:
        start = process_start(pid)
        if start is None:  # exited already; a Group that matches nothing
            start = -1
        group = Group(pid, start, grace_s)
        assert self._lifeline_pipe is not None
        try:
            self._lifeline_pipe.write(f"{pid} {start} {grace_s}\n".encode())
        except BrokenPipeError:  # someone killed the watcher; the child still runs, uncovered
            logger.warning("lifeline gone: %s (pid %s) may outlive a killed supervisor", name, pid)
        if self._run_dir is not None:
            self._records.append(_write_record(self._run_dir, name, group))
        return group


# -- pid files ------------------------------------------------------------------------------


def _identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start": process_start(pid), "boot": boot_id()}


def _is_running(identity: Mapping[str, Any]) -> bool:
    """Whether the process a record names still runs (not merely its pid)."""
    pid = int(identity["pid"])
    return identity["boot"] == boot_id() and process_start(pid) == identity["start"]


def _write_record(run_dir: Path, name: str, group: Group) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.{group.pgid}.pid"  # the pid too: a name may be reused
    record = {
        "name": name,
        "process": _identity(group.pgid),
        "grace_s": group.grace_s,
        "owner": _identity(os.getpid()),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # atomic: a reader never sees half a record
    return path


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        int(record["process"]["pid"]), int(record["owner"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable pid file %s", path)
        return None
    return dict(record)


def reap_stale(run_dir: Path) -> list[str]:
    """End the processes a dead earlier supervisor recorded in ``run_dir``; return their names.

    Raises AlreadyRunningError, killing nothing, if a recorded owner still runs.
    """
    records = {path: _read_record(path) for path in sorted(run_dir.glob("*.pid"))}
    for path, record in records.items():
        owner = record["owner"] if record else None
        if owner and _is_running(owner):
            raise AlreadyRunningError(
                f"process {owner['pid']} still runs the processes recorded in {run_dir} "
                f"({path.name}); stop it first"
            )
    stale = []
    for path, record in records.items():
        group = _recorded_group(record) if record else None
        if record and group and group.alive():
            logger.warning(
                "reaping stale %s (pid %s) left by an earlier run", record["name"], group.pgid
            )
            end_groups([group])
            stale.append(str(record["name"]))
        path.unlink(missing_ok=True)
    return stale


def _recorded_group(record: Mapping[str, Any]) -> Group | None:
    """The group a record names, or None if it names a process of an earlier boot."""
    process = record["process"]
    if process["boot"] != boot_id() or process["start"] is None:
        return None
    return Group(int(process["pid"]), int(process["start"]), float(record["grace_s"]))
