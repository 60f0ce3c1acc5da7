"""The edge never splices a verify reply that does not belong to the state it asked about.

Real NATS; the cloud side is a peer on the verify subject that answers with a reply
built for another state (another request, another context length, more accepted
drafts than were sent), as a confused or stale worker could. The edge's
``CloudRoute.verify`` must refuse each with a 502, and accept the matching one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from nats.aio.msg import Msg

from edge.cloud_route import CloudRoute
from edge.drafter import Draft
from edge.errors import CloudRequestError
from mesh import subjects
from mesh.connection import MeshLink
from mesh.heartbeat import FleetView
from mesh.protocol import VerifyReply, VerifyRequest
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR

MODEL = DEFAULT_PAIR
Skew = Callable[[VerifyRequest], dict[str, object]]


@pytest.fixture
async def route(nats_server: EmbeddedNats) -> AsyncIterator[tuple[CloudRoute, list[Skew]]]:
    link = MeshLink(nats_server.url, name="verify-reply-test")
    link.start()
    nc = await link.wait_connected(timeout_s=10)
    skews: list[Skew] = []

    async def answer(msg: Msg) -> None:
        request = VerifyRequest.from_bytes(msg.data)
        fields: dict[str, object] = {
            "request_id": request.request_id,
            "worker_id": "peer",
            "context_len": len(request.context_token_ids),
            "accepted": len(request.draft_token_ids),
            "next_token": 7,
            "cached_tokens": 0,
        }
        fields.update(skews[-1](request) if skews else {})
        await msg.respond(VerifyReply(**fields).to_bytes())  # type: ignore[arg-type]

    sub = await nc.subscribe(subjects.cloud_verify(MODEL), cb=answer)
    try:
        yield CloudRoute(link, FleetView(nc), MODEL, stall_timeout_s=5), skews
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await link.close()


@pytest.mark.timeout(30)
async def test_a_reply_for_another_state_is_refused(
    route: tuple[CloudRoute, list[Skew]],
) -> None:
    cloud, skews = route

    async def ask() -> VerifyReply:
        return await cloud.verify(
            [1, 2, 3], Draft([4, 5]), sampling=None, session_id=None, deadline=None
        )

    matching = await ask()
    assert (matching.accepted, matching.next_token) == (2, 7)
    for skew in (
        lambda r: {"request_id": "another-request"},
        lambda r: {"context_len": len(r.context_token_ids) + 1},
        lambda r: {"accepted": len(r.draft_token_ids) + 1},
    ):
        skews.append(skew)
        with pytest.raises(CloudRequestError) as refused:
            await ask()
        assert refused.value.status == 502
