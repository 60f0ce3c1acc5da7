"""Errors of the edge daemon, each mapped to one OpenAI-style HTTP answer.

EdgeError                      base; ``status``, ``type`` and ``code`` shape the JSON body
├── InvalidRequestError        400: well-formed JSON asking for something invalid
│   └── ContextLengthError     400: prompt (plus max_tokens) does not fit the context window
├── AuthenticationError        401: missing or wrong API key
├── ModelNotFoundError         404: the ``model`` is not served here
├── ResponseNotFoundError      404: no stored response has that id (Responses API)
├── PayloadTooLargeError       413: request body over the configured limit
├── QueueFullError             429: the engine queue is full; carries ``retry_after_s``
├── RateLimitError             429: the API key's requests or tokens per minute are spent
├── CloudBudgetExceededError   429: the tenant's cloud-token budget is spent (policy: fail)
├── ClientClosedRequest        499: the client left before the answer (nobody reads the body)
├── ServiceUnavailableError    503: the engine is shutting down or not loaded
│   └── CloudUnavailableError  503: no cloud worker could take the request (recoverable:
│                                   the policy may fall back to the edge)
├── CloudRequestError          the worker's ``ErrorCode`` (400, 500, 503, 504), or 502 for a
│                              reply or stream the edge cannot use; carries the ``ErrorInfo``
└── EngineError                500: llama.cpp failed; the request is lost, the daemon is not
"""

from __future__ import annotations

import math

from mesh.protocol import ErrorCode, ErrorInfo


class EdgeError(Exception):
    """Base of every error the edge answers with an OpenAI error body."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers of the answer (Retry-After, rate-limit state)."""
        return {}

    def body(self) -> dict[str, object]:
        """The OpenAI error JSON for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(EdgeError):
    """The request asks for something this server cannot do."""

    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt, or prompt plus requested completion, exceeds the context window."""

    code = "context_length_exceeded"


class AuthenticationError(EdgeError):
    """Missing or wrong Bearer API key."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(EdgeError):
    """The requested model is not served by this edge."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFoundError(EdgeError):
    """No stored response has the id a request names (unknown, unstored or evicted)."""

    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


class PayloadTooLargeError(EdgeError):
    """The request body is larger than the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFullError(EdgeError):
    """Too many requests are waiting for the engine; retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)}


class RateLimitError(EdgeError):
    """An API key is over its requests or tokens per minute (OpenAI's 429 and headers)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after_s: float, headers: dict[str, str], kind: str
    ) -> None:
        super().__init__(message)
        self.type = kind  # OpenAI's type says which limit: "requests" or "tokens"
        self.retry_after_s = retry_after_s
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return {**self._headers, "retry-after": str(max(1, math.ceil(self.retry_after_s)))}


class CloudBudgetExceededError(EdgeError):
    """The routing policy refuses the cloud to a tenant over its hourly budget."""

    status = 429
    type = "insufficient_quota"
    code = "cloud_budget_exceeded"


class ClientClosedRequest(EdgeError):
    """The client disconnected while its answer was being generated; the work was cancelled."""

    status = 499  # nginx's "client closed request": logged as what happened, not as a crash
    type = "client_closed_request"


class ServiceUnavailableError(EdgeError):
    """The engine is not accepting work (starting or draining)."""

    status = 503
    type = "service_unavailable"


class CloudUnavailableError(ServiceUnavailableError):
    """No cloud worker could take the request (none reachable, draining or at capacity)."""

    def headers(self) -> dict[str, str]:
        # Workers come back within seconds (a restart, a freed place): say when to retry.
        return {"retry-after": "1"}


class CloudRequestError(EdgeError):
    """A cloud worker answered with an error, or with a reply the edge cannot use."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info
        self.status = int(info.code)
        self.type = info.type

    @classmethod
    def bad_reply(cls, message: str) -> CloudRequestError:
        """A worker's reply or stream that does not parse or does not fit the request."""
        return cls(ErrorInfo(code=ErrorCode.BAD_REPLY, message=message))


class EngineError(EdgeError):
    """llama.cpp failed while serving one request."""

    status = 500
    type = "server_error"
    code = "engine_error"
