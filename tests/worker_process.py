"""Run a real ``tandem cloud serve`` process (vLLM CPU engine) for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mesh import subjects
from mesh.server import EmbeddedNats


class WorkerProcess:
    """A cloud worker subprocess joined to ``nats``; ready once it subscribes."""

    def __init__(self, nats: EmbeddedNats, worker_id: str, cpu_cores: str | None = None) -> None:
        self.nats = nats
        self.worker_id = worker_id
        self.cpu_cores = cpu_cores
        self.log_path = Path(tempfile.mkstemp(prefix=f"tandem-{worker_id}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch; call ``wait_ready`` before use (vLLM takes a minute or two)."""
        argv = [
            sys.executable,
            "-m",
            "tandem.cli",
            "cloud",
            "serve",
            "--nats-url",
            self.nats.url,
            "--worker-id",
            self.worker_id,
            "--kv-cache-gb",
            "1",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ},
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 480) -> None:
        """Block until the worker's affinity subject has a subscriber."""
        assert self.process is not None
        subject = subjects.worker(self.worker_id, "generate")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.worker_id} exited:\n{self.log()[-4000:]}")
            if self.nats.subscribers(subject) > 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.worker_id} not ready in {timeout_s} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """What the worker logged so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the worker and its vLLM engine processes (the whole process group)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain) and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode
