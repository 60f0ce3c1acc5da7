"""Errors of the cloud worker; each carries the ``ErrorCode`` sent back over the mesh.

CloudError                  base; ``code`` (and the message) shape the error chunk
├── BadGenerateRequestError 400: the request cannot be served as asked
├── DeadlineExceededError   504: the requester's deadline passed
├── DrainingError           503: the worker is shutting down
├── AtCapacityError         503: ``max_in_flight`` requests already
├── WrongModelError         503: the request names a model this worker does not serve
├── EngineFailedError       500: vLLM failed on this request
├── HttpPortError           start-up: /health, /ready and /metrics cannot listen (never
│                           sent over the mesh)
└── KvConnectorError        start-up: the KV connector configuration cannot be used (never
                            sent over the mesh)
"""

from __future__ import annotations

from mesh.protocol import ErrorCode, ErrorInfo


class CloudError(Exception):
    """Base of every error a worker reports in a stream's last chunk or a refusal."""

    code = ErrorCode.SERVER_ERROR

    def info(self) -> ErrorInfo:
        """The wire form of this error."""
        return ErrorInfo(code=self.code, message=str(self))


class BadGenerateRequestError(CloudError):
    """Bad input that reached the cloud: oversize prompt, invalid sampling, bad tools."""

    code = ErrorCode.BAD_REQUEST


class DeadlineExceededError(CloudError):
    """The request's deadline passed before it finished."""

    code = ErrorCode.DEADLINE_EXCEEDED


class DrainingError(CloudError):
    """The worker is draining and takes no new work."""

    code = ErrorCode.UNAVAILABLE


class AtCapacityError(CloudError):
    """The worker has ``max_in_flight`` requests already and takes no more for now."""

    code = ErrorCode.UNAVAILABLE


class WrongModelError(CloudError):
    """The request names a model this worker does not serve (asked by its own subject:
    a stale affinity, or a requester's mistake). Unavailable here, not bad input: the
    requester can ask the model's own workers."""

    code = ErrorCode.UNAVAILABLE


class EngineFailedError(CloudError):
    """vLLM raised while serving the request."""

    code = ErrorCode.SERVER_ERROR


class HttpPortError(CloudError):
    """The worker's HTTP port cannot be bound: a start-up failure, fatal."""


class KvConnectorError(CloudError):
    """The worker's KV connector (``--kv-connector`` and its extra config) cannot be used:
    a start-up failure, fatal, reported before the engine starts."""
