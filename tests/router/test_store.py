"""The policy store on real JetStream KV: CAS writes, history, and the edges' live copy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from mesh import subjects
from mesh.connection import connect
from mesh.protocol import PolicyApplied
from mesh.server import EmbeddedNats
from router.errors import (
    PolicyBucketNotFoundError,
    PolicyConflictError,
    PolicyError,
    RevisionNotFoundError,
    RouterError,
)
from router.live import LivePolicy, PolicyFollower
from router.policy import RoutingPolicy
from router.store import PolicyStore

LOCAL = "# keep it local\nrules: [{name: local, route: edge}]\n"
CLOUDY = "rules: [{name: cloudy, route: cloud}]\ndefault: {route: cloud}\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(store_dir=tmp_path / "js") as s:
        yield s


@pytest.fixture
async def nc(server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(server.url, name="policy-test")
    yield client
    await client.close()


async def test_set_get_history_keep_the_yaml_as_written(nc: Client) -> None:
    store = await PolicyStore.open(nc)
    assert await store.current() is None
    assert await store.history() == []
    first = await store.set(LOCAL, expect_revision=0, author="ana@laptop", message="start")
    second = await store.set(CLOUDY, expect_revision=first, author="bo@desk")
    current = await store.current()
    assert current is not None and current.revision == second
    assert current.policy is not None and current.policy.rules[0].name == "cloudy"
    old = await store.at(first)
    assert old.yaml_text == LOCAL  # comments survive
    assert (old.author, old.message) == ("ana@laptop", "start")
    assert [s.revision for s in await store.history()] == [first, second]
    with pytest.raises(RevisionNotFoundError, match=f"revision {second + 10} is not in"):
        await store.at(second + 10)


async def test_of_two_concurrent_edits_one_lands_and_the_other_is_told(nc: Client) -> None:
    store = await PolicyStore.open(nc)
    base = await store.set(LOCAL, expect_revision=0)
    # Both editors read revision `base`; they write at the same time.
    results = await asyncio.gather(
        store.set(CLOUDY, expect_revision=base, author="ana"),
        store.set(LOCAL.replace("local", "mine"), expect_revision=base, author="bo"),
        return_exceptions=True,
    )
    landed = [r for r in results if isinstance(r, int)]
    lost = [r for r in results if isinstance(r, PolicyConflictError)]
    assert len(landed) == 1 and len(lost) == 1, results
    conflict = lost[0]
    assert conflict.current is not None and conflict.current.revision == landed[0]
    assert f"revision {landed[0]}" in str(conflict) and "Nothing was written" in str(conflict)
    assert len(await store.history()) == 2  # the loser wrote nothing
    # The loser re-reads and re-applies: nothing is lost.
    again = await store.set(CLOUDY, expect_revision=landed[0], author="loser")
    assert again == landed[0] + 1


async def test_store_errors_are_router_errors_a_person_can_act_on(nc: Client) -> None:
    with pytest.raises(PolicyBucketNotFoundError, match=subjects.POLICY_BUCKET) as missing:
        await PolicyStore.open(nc, create=False)
    store = await PolicyStore.open(nc)
    first = await store.set(LOCAL, expect_revision=0)
    with pytest.raises(RevisionNotFoundError) as gone:
        await store.at(first + 1)
    assert all(isinstance(e.value, RouterError) for e in (missing, gone))
    assert not isinstance(gone.value, KeyError)


async def test_invalid_policies_are_never_stored(nc: Client) -> None:
    store = await PolicyStore.open(nc)
    with pytest.raises(PolicyError, match=r"rules\.0\.route"):
        await store.set("rules: [{name: x, route: moon}]", expect_revision=0)
    assert await store.current() is None


async def test_edges_follow_new_revisions_and_refuse_invalid_ones(nc: Client) -> None:
    store = await PolicyStore.open(nc)
    live = LivePolicy(RoutingPolicy(), source="built-in")
    reports: list[PolicyApplied] = []

    async def on_report(msg: object) -> None:
        reports.append(PolicyApplied.from_bytes(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(subjects.policy_applied(), cb=on_report)
    follower = PolicyFollower(nc, live, "edge-a", resync_s=30)
    await follower.start()
    try:
        rev = await store.set(CLOUDY, expect_revision=0)
        await _until(lambda: live.revision == rev)
        assert live.current.default.route == "cloud" and live.source == "store"

        # Written around the store (as `nats kv put` could): never applied.
        kv = await nc.jetstream().key_value(subjects.POLICY_BUCKET)
        bad = await kv.put(subjects.POLICY_KEY, b'{"yaml": "rules: [{name: x, route: moon}]"}')
        await _until(lambda: live.rejected is not None)
        assert live.revision == rev and live.current.default.route == "cloud"
        assert live.rejected is not None and live.rejected.revision == bad
        assert "rules.0.route" in live.rejected.error

        fixed = await store.set(LOCAL, expect_revision=bad)
        await _until(lambda: live.revision == fixed)
        assert live.current.rules[0].name == "local"
        await _until(lambda: len(reports) >= 3)
        verdicts = {(r.revision, r.applied) for r in reports if r.node_id == "edge-a"}
        assert verdicts == {(rev, True), (bad, False), (fixed, True)}
    finally:
        await follower.stop()


async def test_a_follower_catches_up_after_nats_restarts(tmp_path: Path) -> None:
    with EmbeddedNats(store_dir=tmp_path / "js") as server:
        edge_nc = await connect(server.url, name="edge")
        live = LivePolicy(RoutingPolicy())
        follower = PolicyFollower(edge_nc, live, "edge-b", resync_s=0.5)
        await follower.start()
        server.restart()
        writer = await connect(server.url, name="writer")
        try:
            store = await PolicyStore.open(writer)
            rev = await store.set(CLOUDY, expect_revision=0)
            await _until(lambda: live.revision == rev, timeout_s=15)
        finally:
            await follower.stop()
            await writer.close()
            await edge_nc.close()


async def _until(check: object, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
