"""Tandem mesh: everything NATS (connection, subjects, wire protocol, heartbeats, server).

Also the plumbing every daemon on the mesh shares: ``mesh.sampling`` (the speculative
sampling distribution both ends compute) and ``mesh.runtime`` (process start-up).

Importing it needs no running server. Subject names live in ``mesh.subjects``.
"""

from mesh import subjects
from mesh.connection import DEFAULT_NATS_URL, MeshLink, connect, connect_in_background
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
    ErrorCode,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    NodeHeartbeat,
    NodeLoad,
    PolicyApplied,
    PrefillReply,
    PrefillRequest,
    SamplingParams,
    StreamUsage,
    TokenChunk,
    VerifyReply,
    VerifyRequest,
    WireMessage,
)
from mesh.sequencer import ChunkSequencer
from mesh.server import EmbeddedNats, find_nats_server

__all__ = [
    "DEFAULT_NATS_URL",
    "CancelRequest",
    "ChunkSequencer",
    "EmbeddedNats",
    "ErrorCode",
    "ErrorInfo",
    "FleetView",
    "GenerateAccepted",
    "GenerateRequest",
    "Heartbeater",
    "MeshError",
    "MeshLink",
    "MeshUnavailableError",
    "NatsPortInUseError",
    "NatsServerNotFoundError",
    "NatsStartError",
    "NodeHeartbeat",
    "NodeLoad",
    "PolicyApplied",
    "PrefillReply",
    "PrefillRequest",
    "ProtocolError",
    "SamplingParams",
    "StreamUsage",
    "TokenChunk",
    "VerifyReply",
    "VerifyRequest",
    "WireMessage",
    "connect",
    "connect_in_background",
    "find_nats_server",
    "subjects",
]
