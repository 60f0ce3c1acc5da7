"""The edge's OpenAI API over HTTPS, with a certificate from the mesh's dev CA.

``tandem mesh init --tls-host`` makes the CA, ``tandem mesh issue-cert`` the edge's
certificate, and a real edge daemon (``tandem edge serve --tls-certfile ...``) serves
it; the official openai client talks to it through an httpx client (the one openai is
built on) that trusts the CA.
The edge runs the simulated engine: what is tested is the HTTP layer, and the
simulated forward pass answers at once, marked as simulated.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest
from typer.testing import CliRunner

from mesh import subjects
from mesh.protocol import NodeHeartbeat
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.cli import app
from tandem.local import EdgeProcess

pytestmark = pytest.mark.timeout(120)

MODEL = DEFAULT_PAIR
NODE = "edge-https"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


def _tandem(*argv: str) -> str:
    result = CliRunner().invoke(app, list(argv))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mesh with a dev CA, and an HTTPS certificate for this edge signed by it."""
    root = tmp_path_factory.mktemp("mesh")
    _tandem("mesh", "init", str(root), "--tls-host", "127.0.0.1")
    _tandem("mesh", "issue-cert", NODE, "--host", "127.0.0.1", "--host", "localhost",
            "--dir", str(root))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def trusted(mesh_dir: Path) -> ssl.SSLContext:
    """What a client that trusts the mesh's CA verifies the edge with."""
    return ssl.create_default_context(cafile=str(mesh_dir / "tls" / "ca.pem"))


@pytest.fixture(scope="module")
def https_edge(
    mesh_dir: Path, trusted: ssl.SSLContext, nats_server: EmbeddedNats
) -> Iterator[EdgeProcess]:
    """A simulated edge serving HTTPS with the issued certificate, on the session's NATS."""
    tls = mesh_dir / "tls"
    edge = EdgeProcess(
        engine="sim", node_id=NODE, nats_url=nats_server.url, heartbeat_s=0.2,
        tls_certfile=tls / f"{NODE}-http.pem", tls_keyfile=tls / f"{NODE}-http-key.pem",
    )  # fmt: skip
    edge.launch()
    try:
        assert edge.child is not None
        edge.child.wait_ready(lambda: _answers(_https(edge), trusted), timeout_s=60)
        yield edge
    finally:
        edge.stop()


def _https(edge: EdgeProcess) -> str:
    return f"https://127.0.0.1:{edge.port}"


def _answers(base_url: str, verify: ssl.SSLContext) -> bool:
    try:
        return httpx.get(f"{base_url}/health", verify=verify, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_client_that_trusts_the_mesh_ca_gets_answers(
    https_edge: EdgeProcess, trusted: ssl.SSLContext
) -> None:
    with (
        openai.DefaultHttpxClient(verify=trusted) as http,  # the openai client's own httpx
        openai.OpenAI(
            base_url=f"{_https(https_edge)}/v1", api_key="unused", http_client=http, max_retries=0
        ) as client,
    ):
        answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert answer.choices[0].message.content
    assert answer.system_fingerprint == "tandem-simulated-engine"


def test_a_client_that_does_not_trust_the_ca_fails_verification(https_edge: EdgeProcess) -> None:
    with (
        openai.DefaultHttpxClient() as http,  # the system's CAs only
        openai.OpenAI(
            base_url=f"{_https(https_edge)}/v1", api_key="unused", http_client=http, max_retries=0
        ) as client,
        pytest.raises(openai.APIConnectionError) as failed,
    ):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert "CERTIFICATE_VERIFY_FAILED" in repr(failed.value.__cause__)


def test_plain_http_to_the_tls_port_gets_no_answer(https_edge: EdgeProcess) -> None:
    with pytest.raises(httpx.TransportError) as failed:
        httpx.get(f"http://127.0.0.1:{https_edge.port}/health", timeout=5)
    assert not isinstance(failed.value, httpx.TimeoutException)  # refused, not ignored


def test_the_heartbeat_advertises_the_https_endpoint(
    https_edge: EdgeProcess, nats_server: EmbeddedNats
) -> None:
    async def next_beat() -> NodeHeartbeat:
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.subscribe(subjects.node_load(NODE))
            return NodeHeartbeat.from_bytes((await sub.next_msg(timeout=10)).data)
        finally:
            await nc.close()

    assert asyncio.run(next_beat()).endpoint == f"https://127.0.0.1:{https_edge.port}"


def test_a_certificate_without_its_key_is_refused_at_start(mesh_dir: Path) -> None:
    cert = mesh_dir / "tls" / f"{NODE}-http.pem"
    result = CliRunner().invoke(app, ["edge", "serve", "--tls-certfile", str(cert)])
    assert result.exit_code != 0
    assert "needs both tls_certfile and tls_keyfile" in result.output
