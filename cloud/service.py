"""Running a cloud worker process: engine start, mesh service, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import signal

from cloud.engine import CloudEngine, VllmEngine
from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from mesh.runtime import freeze_startup_objects

logger = logging.getLogger(__name__)


def make_engine(settings: CloudSettings) -> CloudEngine:
    """vLLM, or the simulated engine (imports no vLLM) when ``settings.engine`` is 'sim'."""
    if settings.engine == "sim":
        from cloud.sim_engine import SimVllmEngine

        return SimVllmEngine(settings)
    return VllmEngine(settings)


async def run_worker(settings: CloudSettings) -> None:
    """Start vLLM, join the mesh, serve until SIGTERM/SIGINT, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = make_engine(settings)
    await engine.start()
    worker = CloudWorker(settings, engine)
    try:
        await worker.start()
        freeze_startup_objects()
        await stop.wait()
        logger.info("stop requested: draining")
        await worker.drain()
    finally:
        engine.shutdown()
