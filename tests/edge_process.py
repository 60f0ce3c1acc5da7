"""Run a real ``tandem edge serve`` process on a free port for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import openai

from mesh.server import stop_process


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EdgeProcess:
    """An edge daemon subprocess; options map to ``tandem edge serve`` flags."""

    def __init__(self, **options: Any) -> None:
        self.port = free_port()
        self.options = options
        self.log_path = Path(tempfile.mkstemp(prefix="tandem-edge-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[openai.OpenAI] = []

    @property
    def base_url(self) -> str:
        """The HTTP root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An official OpenAI client pointed at this edge."""
        kwargs.setdefault("api_key", "unused")
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)
        self._clients.append(client)  # closed in stop(): no leaked sockets
        return client

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An async official OpenAI client pointed at this edge."""
        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of ``/metrics`` as a flat dict."""
        headers = {}
        if "api_key" in self.options:
            headers["authorization"] = f"Bearer {self.options['api_key']}"
        text = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=5).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log(self) -> str:
        """What the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        """Launch and wait until ``/health`` answers."""
        argv = [sys.executable, "-m", "tandem.cli", "edge", "serve", "--port", str(self.port)]
        # Every setting through its environment variable, as a systemd unit would set it.
        env = {f"TANDEM_EDGE_{k.upper()}": str(v) for k, v in self.options.items()}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"edge exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"edge did not become healthy:\n{self.log()}")

    def stop(self) -> None:
        """Close clients; SIGTERM, then SIGKILL if it lingers."""
        for client in self._clients:
            client.close()
        if self.process is not None:
            stop_process(self.process, grace_s=15, name="edge")
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EdgeProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
