"""The cloud worker's HTTP side: liveness, readiness and Prometheus metrics.

``GET /health``
    200 while the process and its event loop answer (Kubernetes' liveness probe).
``GET /ready``
    200 once the engine is loaded, the worker is subscribed on NATS and it is not
    draining; 503 with the reason otherwise (readiness and startup probes).
    SIGTERM's drain turns it 503 at once; ``/health`` stays 200 until the exit.
``GET /metrics``
    Prometheus text. vLLM's own collectors (``vllm:num_requests_running``,
    ``vllm:time_to_first_token_seconds``, ...): AsyncLLM with stats on adds vLLM's
    ``PrometheusStatLogger``, which registers them in prometheus_client's default
    registry of this process; they are exposed as vLLM records them. Beside them
    Tandem's ``tandem_worker_*``, which vLLM cannot know: verification rounds,
    engine-busy seconds, drain state, requests in flight. The simulated engine
    has no vLLM, so its worker shows only Tandem's (and the process's) metrics.

A small HTTP/1.1 server on asyncio streams inside the worker's event loop (the cloud
extra has no web framework): GET and HEAD, one request per connection, no bodies
read. The exposition renders in a thread so a scrape never holds the loop that
streams tokens.

Example::

    curl -s 127.0.0.1:8081/ready   # {"ready":true,"reason":null,"worker_id":"cloud-..."}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict

from cloud.errors import HttpPortError
from cloud.worker import CloudWorker
from mesh import bad_messages

logger = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0  # a client that sends no request line in this long is dropped
_MAX_HEADER_LINES = 100
_JSON = "application/json"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


class Health(BaseModel):
    """Body of ``/health``."""

    model_config = ConfigDict(extra="forbid")

    status: str = "ok"
    worker_id: str


class Readiness(BaseModel):
    """Body of ``/ready``: ready, or why not."""

    model_config = ConfigDict(extra="forbid")

    ready: bool
    reason: str | None
    worker_id: str


class _TandemCollector(Collector):
    """``tandem_worker_*``: what the worker knows and vLLM does not, read at scrape time."""

    def __init__(self, worker: CloudWorker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w, labels = self._worker, [self._worker.engine.pair.name]
        counts = w.verify_counts
        for name, doc, value in (
            ("verify_rounds", "Verification rounds answered (one forward pass each).",
             counts.rounds),
            ("verify_draft_tokens", "Draft tokens judged by those rounds.", counts.draft_tokens),
            ("verify_accepted_tokens", "Draft tokens the target kept.", counts.accepted_tokens),
            ("engine_busy_seconds",
             "Wall seconds with at least one request inside the engine (measured around "
             "the worker's calls into it).", w.engine.busy.busy_s),
            # Disaggregation (cloud.disaggregation): a prefill worker's, a decode worker's.
            ("prefills_served", "Prompts prefilled for decode workers (prefill role).",
             w.prefill_counts.served),
            ("remote_prefills_asked", "Prompts sent to the prefill pool (decode role).",
             w.prefill_counts.asked),
            ("remote_prefills_transferred", "Of them, prefilled remotely (KV handed over).",
             w.prefill_counts.transferred),
            ("remote_prefills_fell_back",
             "Of them, prefilled here after all (no prefill worker, timeout, error).",
             w.prefill_counts.fell_back),
            ("local_prefills", "Prompts the policy left to this decode worker.",
             w.prefill_counts.local),
            ("refused_at_capacity",
             "Generate requests refused (503) while max_in_flight were in flight.",
             w.refused_at_capacity),
            ("refused_wrong_model",
             "Requests refused (503) for naming a model this worker does not serve.",
             w.refused_wrong_model),
            # cloud.prompt_reuse: the edge's prompt token ids, or this worker's own.
            ("prompt_ids_reused", "Generate requests served with the edge's prompt ids.",
             w.prompt_reuse.reused),
            ("prompt_ids_tokenized",
             "Generate requests that came without prompt ids (or after reuse turned off).",
             w.prompt_reuse.tokenized),
            ("prompt_ids_refused",
             "Edge prompt ids not used: another rendering, ids outside the vocabulary, or "
             "a verification mismatch (which turns reuse off).", w.prompt_reuse.refused),
        ):  # fmt: skip
            family = CounterMetricFamily(f"tandem_worker_{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        for name, doc, value in (
            ("draining", "1 once SIGTERM's drain began: no new requests.", float(w.draining)),
            ("active_requests", "Generations and verifications in flight on this worker.",
             float(w.in_flight)),
            ("ready", "1 when /ready answers 200.", float(w.unready_reason() is None)),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(f"tandem_worker_{name}", doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        bad = CounterMetricFamily(
            "tandem_worker_bad_messages",
            "Malformed mesh messages received, by message kind (mesh.bad_messages).",
            labels=["model_name", "kind"],
        )
        for kind, count in sorted(bad_messages.RECEIVED.counts.items()):
            bad.add_metric([*labels, kind], count)
        yield bad


class _DefaultRegistry(Collector):
    """prometheus_client's process-wide registry, where vLLM registers its collectors."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class WorkerMetrics:
    """The exposition of ``/metrics``: vLLM's collectors and Tandem's, on one registry."""

    def __init__(self, worker: CloudWorker) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DefaultRegistry())
        self.registry.register(_TandemCollector(worker))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class StatusServer:
    """``/health``, ``/ready`` and ``/metrics`` of one worker on ``host:port``."""

    def __init__(self, worker: CloudWorker, host: str, port: int) -> None:
        self.worker = worker
        self.metrics = WorkerMetrics(worker)
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; HttpPortError when the port cannot be bound."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise HttpPortError(
                f"cannot listen on {self.host}:{self.port} for /health, /ready and /metrics: "
                f"{exc.strerror or exc} (set --http-port, or 0 to turn them off)"
            ) from exc
        logger.info("health, readiness and metrics on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        if method not in ("GET", "HEAD"):
            return 405, _JSON, b'{"error":"only GET and HEAD"}'
        worker_id = self.worker.settings.worker_id
        match path.split("?", 1)[0]:
            case "/health":
                return 200, _JSON, Health(worker_id=worker_id).model_dump_json().encode()
            case "/ready":
                reason = self.worker.unready_reason()
                body = Readiness(ready=reason is None, reason=reason, worker_id=worker_id)
                return 200 if reason is None else 503, _JSON, body.model_dump_json().encode()
            case "/metrics":
                return 200, CONTENT_TYPE_LATEST, await asyncio.to_thread(self.metrics.render)
        return 404, _JSON, b'{"error":"try /health, /ready or /metrics"}'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    method, path = await _read_request(reader)
            except ValueError:
                status, ctype, body = 400, _JSON, b'{"error":"malformed request"}'
                method = "GET"
            else:
                status, ctype, body = await self.answer(method, path)
            writer.write(_head(status, ctype, len(body)) + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # the client went away or never spoke: nothing to answer
        except Exception:  # a scrape must never take the worker down
            logger.exception("HTTP request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Method and target of one request; its headers are read and ignored.

    ValueError for a malformed request line or too many header lines (StreamReader
    raises it for an over-long line too).
    """
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("malformed request line")
    for _ in range(_MAX_HEADER_LINES):
        if (await reader.readline()).strip() == b"":
            return parts[0], parts[1]
    raise ValueError("too many header lines")


def _head(status: int, content_type: str, length: int) -> bytes:
    """A response's status line and headers."""
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
