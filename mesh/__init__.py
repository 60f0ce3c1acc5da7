"""Tandem mesh: everything NATS (connection, subjects, wire protocol, heartbeats, server).

Importing it needs no running server. Subject names live in ``mesh.subjects``.
"""

from mesh import subjects
from mesh.connection import MeshLink, connect, connect_in_background
from mesh.errors import (
    MeshError,
    MeshUnavailableError,
    NatsPortInUseError,
    NatsServerNotFoundError,
    NatsStartError,
    ProtocolError,
)
from mesh.heartbeat import FleetView, Heartbeater
from mesh.protocol import (
    CancelRequest,
    ChunkSequencer,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    Message,
    NodeHeartbeat,
    NodeLoad,
    SamplingParams,
    TokenChunk,
    VerifyReply,
    VerifyRequest,
    WireMessage,
    parse_message,
)
from mesh.server import EmbeddedNats, find_nats_server

__all__ = [
    "CancelRequest",
    "ChunkSequencer",
    "EmbeddedNats",
    "ErrorInfo",
    "FleetView",
    "GenerateAccepted",
    "GenerateRequest",
    "Heartbeater",
    "MeshError",
    "MeshLink",
    "MeshUnavailableError",
    "Message",
    "NatsPortInUseError",
    "NatsServerNotFoundError",
    "NatsStartError",
    "NodeHeartbeat",
    "NodeLoad",
    "ProtocolError",
    "SamplingParams",
    "TokenChunk",
    "VerifyReply",
    "VerifyRequest",
    "WireMessage",
    "connect",
    "connect_in_background",
    "find_nats_server",
    "parse_message",
    "subjects",
]
