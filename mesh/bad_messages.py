"""Malformed mesh messages a node received: counted by kind, logged once in a while.

Anyone allowed to publish on a subject can publish garbage there (a buggy edge, an old
version, a fuzzer). A node answers what it can (a ``generate`` that does not parse gets a
400 reply), drops the rest, and must neither wedge nor flood its log: the first bad
message of a kind is logged at WARNING, later ones only as a count once per
``interval_s``. The counts are exported (``tandem_worker_bad_messages_total``).

Example::

    from mesh.bad_messages import note_bad_message
    note_bad_message("heartbeat", msg.subject, exc, logger)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

LOG_INTERVAL_S = 60.0


class BadMessages:
    """Counts per kind, and when each kind was last logged."""

    def __init__(
        self, *, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.counts: Counter[str] = Counter()
        self._interval_s, self._clock = interval_s, clock
        self._logged_at: dict[str, float] = {}
        self._logged_count: Counter[str] = Counter()
        self._lock = threading.Lock()  # the edge's engine threads report too

    def note(self, kind: str, subject: str, error: object, logger: logging.Logger) -> None:
        """Count one bad message of ``kind``; log it if this kind was quiet long enough."""
        now = self._clock()
        with self._lock:
            self.counts[kind] += 1
            last = self._logged_at.get(kind)
            if last is not None and now - last < self._interval_s:
                return
            since = self.counts[kind] - self._logged_count[kind]
            self._logged_at[kind], self._logged_count[kind] = now, self.counts[kind]
        more = f" ({since} of them since the last report)" if since > 1 else ""
        logger.warning("ignoring a malformed %s message on %s: %s%s", kind, subject, error, more)


RECEIVED = BadMessages()  # this process's


def note_bad_message(kind: str, subject: str, error: object, logger: logging.Logger) -> None:
    """Count and (now and then) log a malformed message this process received."""
    RECEIVED.note(kind, subject, error, logger)
