"""A cloud pool at capacity refuses at once, with a reason, instead of queueing to the deadline.

Real processes on a real nats-server: one cloud worker with ``max_in_flight: 1`` and two
edges, all with the SIMULATED engine (admission is the worker's, not the forward pass's).
One edge's policy falls back to its own model (the default); the other's fails (503).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mesh import subjects
from mesh.connection import connect
from mesh.protocol import ErrorCode, ErrorInfo, GenerateRequest, SamplingParams
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess, WorkerProcess, wait_heard

pytestmark = pytest.mark.timeout(180)

MODEL = DEFAULT_PAIR
CLOUD = {"x-tandem-route": "cloud"}


@pytest.fixture(scope="module")
def worker(nats_server: EmbeddedNats) -> Iterator[WorkerProcess]:
    with WorkerProcess(nats_server, "cap-1", engine="sim", max_in_flight=1) as proc:
        yield proc


def _edge(nats: EmbeddedNats, policy: Path | None = None) -> EdgeProcess:
    options: dict[str, Any] = {"policy_file": policy} if policy else {}
    return EdgeProcess(engine="sim", nats_url=nats.url, **options)


def _while_one_streams(edge: EdgeProcess, ask: Any) -> Any:
    """``ask()`` while a long cloud stream holds the worker's only place."""
    started, result = threading.Event(), {}

    def long_stream() -> None:
        stream = edge.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a long one"}],
            max_tokens=200, stream=True, extra_headers=CLOUD,
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        result["done"] = True

    holder = threading.Thread(target=long_stream)
    holder.start()
    assert started.wait(60), "the long stream never started"
    try:
        return ask()
    finally:
        holder.join(120)
        assert result.get("done"), "the stream holding the place did not finish"


def test_at_capacity_the_edge_answers_itself_marked(
    nats_server: EmbeddedNats, worker: WorkerProcess
) -> None:
    with _edge(nats_server) as edge:
        wait_heard(edge)
        answer = _while_one_streams(
            edge,
            lambda: edge.client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_headers=CLOUD,
            ),
        )
        assert dict(answer.usage.model_extra or {})["tandem"]["route"] == "edge-fallback"
    metrics = httpx.get(f"{worker.http_url}/metrics", timeout=5).text
    refused = [ln for ln in metrics.splitlines() if ln.startswith("tandem_worker_refused_at_cap")]
    assert refused and float(refused[0].rpartition(" ")[2]) >= 1, refused


def test_at_capacity_a_fail_policy_answers_503_with_the_reason(
    nats_server: EmbeddedNats, worker: WorkerProcess, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("fallbacks: {cloud_unavailable: fail}\n")
    with _edge(nats_server, policy) as edge:
        wait_heard(edge)

        def ask() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as refused:
                edge.client().chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                    extra_headers=CLOUD,
                )  # fmt: skip
            return refused.value

        error = _while_one_streams(edge, ask)
        assert error.status_code == 503
        assert error.response.headers["retry-after"] == "1"
        body = error.response.json()["error"]
        assert body["type"] == "service_unavailable"
        assert "at capacity (1 requests in flight)" in body["message"], body
        # Once the place is free, the same request is served by the worker.
        again = edge.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_headers=CLOUD,
        )  # fmt: skip
        assert dict(again.usage.model_extra or {})["tandem"]["worker_id"] == "cap-1"


def test_a_full_worker_sends_the_edge_to_one_with_room(
    nats_server: EmbeddedNats, worker: WorkerProcess
) -> None:
    """Two workers of one place each, one of them busy: the model's queue group picks
    either, so without asking the other by its own subject each request had even odds of
    a needless 503; four rounds all served by the free worker."""
    # The default policy: a needless refusal shows as route edge-fallback.
    with (
        WorkerProcess(nats_server, "cap-2", engine="sim", max_in_flight=1),
        _edge(nats_server) as edge,
    ):
        wait_heard(edge)
        for _ in range(4):
            answers = _while_one_streams(
                edge,
                lambda: [
                    edge.client().chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=4,
                        extra_headers=CLOUD,
                    )
                    for _ in range(2)
                ],
            )
            routes = [dict(a.usage.model_extra or {})["tandem"]["route"] for a in answers]
            assert routes == ["cloud", "cloud"], routes


async def _ask_worker(nats: EmbeddedNats, worker_id: str, model: str) -> ErrorInfo | None:
    """A generate request for ``model`` on ``worker_id``'s own subject; the refusal, if
    any (an accepted request is cancelled by closing the connection)."""
    nc = await connect(nats.url, name="wrong-model-test")
    try:
        request = GenerateRequest(
            request_id=uuid.uuid4().hex, model=model, reply_subject=nc.new_inbox(),
            messages=[{"role": "user", "content": "hi"}], sampling=SamplingParams(max_tokens=2),
        )  # fmt: skip
        reply = await nc.request(
            subjects.worker(worker_id, "generate"), request.to_bytes(), timeout=10
        )
        return ErrorInfo.from_service_headers(reply.headers)
    finally:
        await nc.close()


def test_a_worker_refuses_a_request_for_a_model_it_does_not_serve(
    nats_server: EmbeddedNats, worker: WorkerProcess
) -> None:
    """Asked by its own subject (the per-model queue groups cannot mix models up) for
    another model, a worker refuses with 503 and says what it serves; its own model it
    serves. Unavailable, not bad input: an edge goes on to the model's own workers."""
    refused = asyncio.run(_ask_worker(nats_server, "cap-1", "another/model-7b"))
    assert refused is not None and refused.code == ErrorCode.UNAVAILABLE
    assert refused.message == f"worker cap-1 serves {MODEL!r}, not 'another/model-7b'"
    assert asyncio.run(_ask_worker(nats_server, "cap-1", MODEL)) is None
    metrics = httpx.get(f"{worker.http_url}/metrics", timeout=5).text
    counted = [ln for ln in metrics.splitlines() if ln.startswith("tandem_worker_refused_wrong")]
    assert counted and float(counted[0].rpartition(" ")[2]) >= 1, counted
