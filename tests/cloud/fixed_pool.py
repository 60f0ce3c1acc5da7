"""A planner connector over a fixed set of workers, for tests that publish the workers'
heartbeats themselves: the planner observes and decides, and is never expected to act."""

from __future__ import annotations


class FixedPool:
    """A connector whose pool is ``worker_ids`` and is never asked to change it."""

    def __init__(self, *worker_ids: str) -> None:
        self.worker_ids = list(worker_ids)

    async def workers(self) -> list[str]:
        return list(self.worker_ids)

    async def scale_up(self, count: int) -> list[str]:
        raise AssertionError("not expected")

    async def drain(self, worker_id: str) -> None:
        raise AssertionError("not expected")

    def removable(self, worker_ids: list[str]) -> list[str]:
        return []
