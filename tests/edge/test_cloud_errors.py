"""A worker's typed refusals reach the edge as the same ``ErrorCode``, over real NATS.

The peer on the verify subject refuses the way a worker does (``respond_error``'s
headers, written from an ``ErrorInfo``): the edge raises ``CloudRequestError`` with the
worker's code, skips a draining worker (503) to the next subject, and calls an
unknown code a bad reply (502) instead of guessing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from edge.cloud_route import CloudRoute
from edge.drafter import Draft
from edge.errors import CloudRequestError, CloudUnavailableError
from mesh import subjects
from mesh.connection import MeshLink
from mesh.heartbeat import FleetView
from mesh.protocol import ErrorCode, ErrorInfo
from mesh.server import EmbeddedNats

# A model name of this module alone: real workers on the shared server never take it.
MODEL = "tests.edge/cloud-errors-model"


@pytest.fixture
async def refusing(nats_server: EmbeddedNats) -> AsyncIterator[tuple[CloudRoute, list[str]]]:
    link = MeshLink(nats_server.url, name="cloud-errors-test")
    link.start()
    nc = await link.wait_connected(timeout_s=10)
    codes: list[str] = []  # the code the peer refuses with next

    async def refuse(msg: Msg) -> None:
        code = codes[-1]
        await nc.publish(msg.reply, b"", headers={ERROR_CODE_HEADER: code, ERROR_HEADER: "no"})

    sub = await nc.subscribe(subjects.cloud_verify(MODEL), cb=refuse)
    try:
        yield CloudRoute(link, FleetView(nc), MODEL, stall_timeout_s=5), codes
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await link.close()


async def _verify(cloud: CloudRoute) -> object:
    return await cloud.verify([1, 2, 3], Draft([4]), sampling=None, session_id=None, deadline=None)


@pytest.mark.timeout(30)
async def test_a_workers_error_code_is_the_edges_status(
    refusing: tuple[CloudRoute, list[str]],
) -> None:
    cloud, codes = refusing
    for code in (ErrorCode.BAD_REQUEST, ErrorCode.SERVER_ERROR, ErrorCode.DEADLINE_EXCEEDED):
        codes.append(ErrorInfo(code=code, message="no").service_error()[0])
        with pytest.raises(CloudRequestError) as refused:
            await _verify(cloud)
        assert refused.value.info.code is code
        assert (refused.value.status, refused.value.type) == (int(code), code.openai_type)


@pytest.mark.timeout(30)
async def test_draining_moves_on_and_an_unknown_code_is_a_bad_reply(
    refusing: tuple[CloudRoute, list[str]],
) -> None:
    cloud, codes = refusing
    codes.append(str(int(ErrorCode.UNAVAILABLE)))
    with pytest.raises(CloudUnavailableError) as unavailable:
        await _verify(cloud)  # the only worker drains: nobody else serves the model
    codes.append("418")
    with pytest.raises(CloudRequestError) as bad:
        await _verify(cloud)
    assert unavailable.value.status == 503
    assert bad.value.status == 502 and "418" in bad.value.message
