"""Running a cloud worker process: engine start, mesh service, HTTP probes, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import signal

from cloud.engine import CloudEngine, VllmEngine
from cloud.http import StatusServer
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
    """Start vLLM, join the mesh, serve until SIGTERM/SIGINT, then drain and stop.

    The HTTP side listens first, so a port clash fails before a minute of engine
    start-up, and ``/ready`` says "the engine is loading" once the loop is free to
    answer (vLLM's own start-up holds it). ``/health`` answers through the drain.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = make_engine(settings)
    worker = CloudWorker(settings, engine)
    status = None
    if settings.http_port:
        status = StatusServer(worker, settings.http_host, settings.http_port)
        await status.start()
    try:
        await engine.start()
        await worker.start()
        freeze_startup_objects()
        await stop.wait()
        logger.info("stop requested: draining")
        await worker.drain()
    finally:
        engine.shutdown()
        if status is not None:
            await status.stop()
