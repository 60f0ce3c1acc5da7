"""Running a cloud worker process: engine start, mesh service, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import signal

from cloud.engine import VllmEngine
from cloud.settings import CloudSettings
from cloud.worker import CloudWorker

logger = logging.getLogger(__name__)


async def run_worker(settings: CloudSettings) -> None:
    """Start vLLM, join the mesh, serve until SIGTERM/SIGINT, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = VllmEngine(settings)
    await engine.start()
    worker = CloudWorker(settings, engine)
    try:
        await worker.start()
        await stop.wait()
        logger.info("stop requested: draining")
        await worker.drain()
    finally:
        engine.shutdown()
