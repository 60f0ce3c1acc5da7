"""The supervisor's lifeline: a watcher process that ends every group once its supervisor is gone.

The supervisor (``tandem.supervisor``) starts this module as ``python -m
tandem.lifeline`` in a session of its own, with a pipe on stdin whose write end
only the supervisor holds. For each process group it starts, the supervisor
writes one line, ``<pgid> <leader start ticks> <grace seconds>``. The watcher
blocks reading; end of file means the supervisor closed the pipe (a clean stop)
or died, however it died, SIGKILL included. It then ends each group still
alive: SIGTERM to the leader (it drains), SIGKILL to the whole group after the
grace period (grandchildren such as vLLM's engine core die with it).

Standard library only, so it starts in a few tens of milliseconds, and nothing
here may import the rest of Tandem.

The process-group helpers live here too because the supervisor ends groups
the same way when it stops a child, and reaps stale ones the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.05
_KILL_WAIT_S = 5.0


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if none runs.

    With the boot id, (pid, start time) names one process for good: a pid that was
    reused belongs to a process started later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_id() -> str:
    """This boot's id: start ticks from an earlier boot name nothing running now."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        # fields[0] is the state, fields[2] the process group. A zombie has exited:
        # it only waits for a parent to reap it, and holds no port or memory.
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class Group:
    """A process group a supervisor started: its leader's pid is the group id."""

    pgid: int
    leader_start: int
    grace_s: float

    def alive(self) -> bool:
        """Whether any process of this group still lives.

        The kernel gives out no pid that still names a process group, so a pgid can
        only be reused once the group is empty; a leader pid alive with another start
        time is such a reuse, an unrelated process that must not be touched.
        """
        start = process_start(self.pgid)
        if start is not None and start != self.leader_start:
            return False
        return bool(group_members(self.pgid))

    def signal_leader(self, signum: int) -> None:
        """Send ``signum`` to the leader, or to the group once the leader is gone."""
        with contextlib.suppress(ProcessLookupError):
            if process_start(self.pgid) == self.leader_start:
                os.kill(self.pgid, signum)
            else:
                os.killpg(self.pgid, signum)

    def kill(self) -> None:
        """SIGKILL every process of the group (a no-op once it is gone)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)


def end_groups(groups: list[Group], *, drain: bool = True) -> None:
    """SIGTERM each live group's leader, SIGKILL each group still alive after its grace.

    Returns once every group is empty. ``drain=False`` kills at once (a crash). A
    group is killed again on every poll past its deadline, which also catches a
    process forked while it was being killed; one that still lives ``_KILL_WAIT_S``
    later (stuck in the kernel) is given up on.
    """
    pending = [group for group in groups if group.alive()]
    if drain:
        for group in pending:
            group.signal_leader(signal.SIGTERM)
    start = time.monotonic()
    kill_at = {group: start + (group.grace_s if drain else 0.0) for group in pending}
    while pending:
        now = time.monotonic()
        for group in pending:
            if now >= kill_at[group]:
                group.kill()
        pending = [g for g in pending if g.alive() and now < kill_at[g] + _KILL_WAIT_S]
        if pending:
            time.sleep(_POLL_S)


def _parse(line: bytes) -> Group:
    pgid, start, grace = line.split()
    return Group(int(pgid), int(start), float(grace))


def main() -> None:
    """Collect groups from stdin until end of file, then end every one still alive."""
    # Our own session keeps a terminal's signals away; SIGINT may still come from a
    # person's kill: the groups must be ended either way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups = [_parse(line) for line in sys.stdin.buffer if line.strip()]
    end_groups(groups)


if __name__ == "__main__":
    main()
