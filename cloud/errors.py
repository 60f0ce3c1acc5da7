"""Errors of the cloud worker; each maps to an OpenAI-style status sent back over the mesh.

CloudError                 base; ``status`` and ``type`` shape the error chunk
├── BadGenerateRequestError 400: the request cannot be served as asked
├── DeadlineExceededError   504: the requester's deadline passed
├── DrainingError           503: the worker is shutting down
└── EngineFailedError       500: vLLM failed on this request
"""

from __future__ import annotations

from mesh.protocol import ErrorInfo


class CloudError(Exception):
    """Base of every error a worker reports in a stream's last chunk."""

    status = 500
    type = "server_error"

    def info(self) -> ErrorInfo:
        """The wire form of this error."""
        return ErrorInfo(code=self.status, type=self.type, message=str(self))


class BadGenerateRequestError(CloudError):
    """Bad input that reached the cloud: oversize prompt, invalid sampling, bad tools."""

    status = 400
    type = "invalid_request_error"


class DeadlineExceededError(CloudError):
    """The request's deadline passed before it finished."""

    status = 504
    type = "timeout"


class DrainingError(CloudError):
    """The worker is draining and takes no new work."""

    status = 503
    type = "service_unavailable"


class EngineFailedError(CloudError):
    """vLLM raised while serving the request."""

    status = 500
    type = "server_error"
