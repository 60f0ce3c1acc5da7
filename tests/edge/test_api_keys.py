"""Per-tenant API keys: the key checks and limits, then real edge daemons that enforce them.

The daemons are real (llama.cpp, a real nats-server running ``tandem mesh``'s
configuration); keys are made with the real ``tandem keys`` command.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from edge.api_keys import (
    ApiKey,
    Authenticator,
    KeyRing,
    new_key,
    read_key_file,
    write_key_file,
)
from edge.errors import AuthenticationError, RateLimitError
from edge.rate_limits import RateLimiter, duration
from mesh.security import MeshDir, Role
from mesh.server import EmbeddedNats
from tandem.cli import app
from tandem.commands.keys import expiry
from tandem.local import EdgeProcess
from tests.fixtures_nats import mesh_with

MODEL = "smollm2-135m"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# Tells a request's tenant by the rule that routed it (x-tandem-rule): both stay on the edge.
POLICY = (
    "rules:\n"
    "  - {name: tenant-acme, when: {tenant: [acme]}, route: edge}\n"
    "  - {name: tenant-other, when: {tenant: [other]}, route: edge}\n"
    "default: {route: edge}\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- keys and limits, in process -------------------------------------------------------------


def test_a_key_is_checked_by_its_hash_and_refused_clearly_when_bad() -> None:
    secret, key = new_key("acme")
    assert secret not in key.model_dump_json()  # the record never holds the secret
    auth = Authenticator(ring=KeyRing([key]))
    assert auth.principal(f"Bearer {secret}").tenant == "acme"
    # The last character changed, never to itself (CI once drew a secret ending in x).
    wrong = secret[:-1] + ("y" if secret.endswith("x") else "x")
    bad = {
        None: "missing API key",
        "Basic abc": "malformed Authorization header",
        "Bearer sk-not-ours": "malformed API key",
        f"Bearer {wrong}": "invalid or revoked API key",
    }
    for header, message in bad.items():
        with pytest.raises(AuthenticationError, match=message):
            auth.principal(header)
    auth.ring.remove(key.id)  # type: ignore[union-attr]
    with pytest.raises(AuthenticationError, match="invalid or revoked"):
        auth.principal(f"Bearer {secret}")


def test_an_expired_key_is_refused_with_when() -> None:
    secret, key = new_key("acme", expires_at=datetime(2026, 1, 1, tzinfo=UTC))
    ring = KeyRing([key])
    assert ring.check(secret, datetime(2025, 12, 31, tzinfo=UTC).timestamp()) == key
    with pytest.raises(AuthenticationError, match="expired at 2026-01-01"):
        ring.check(secret, datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp())


def test_only_keys_allowed_to_may_name_another_tenant() -> None:
    s1, plain = new_key("acme")
    s2, gateway = new_key("gw", may_set_tenant=True)
    auth = Authenticator(ring=KeyRing([plain, gateway]))
    assert auth.principal(f"Bearer {s1}").tenant_for("other") == "acme"
    assert auth.principal(f"Bearer {s2}").tenant_for("other") == "other"
    assert auth.principal(f"Bearer {s2}").tenant_for(None) == "gw"


def test_requests_per_minute_drain_continuously_with_openai_headers() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    _, key = new_key("acme", rpm=3)
    remaining = [limiter.admit(key)["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(key)
    headers = refused.value.headers()
    assert refused.value.type == "requests" and refused.value.status == 429
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"  # full again after a minute
    assert headers["retry-after"] == "20"  # one request drains back every 20 s
    clock.now += 20
    assert limiter.admit(key)["x-ratelimit-remaining-requests"] == "0"


def test_tokens_are_charged_when_known_and_hold_the_next_request() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    _, key = new_key("acme", tpm=600)
    _, other = new_key("other", tpm=600)
    assert limiter.admit(key)["x-ratelimit-remaining-tokens"] == "600"
    limiter.charge(key, 700)  # the answer that overflows the bucket
    with pytest.raises(RateLimitError, match="600 tokens per minute") as refused:
        limiter.admit(key)
    assert refused.value.type == "tokens"
    assert refused.value.headers()["retry-after"] == "11"  # 101 tokens drain in 10.1 s
    assert limiter.admit(other)["x-ratelimit-remaining-tokens"] == "600"  # its own bucket
    clock.now += 10.2
    assert limiter.admit(key)["x-ratelimit-remaining-tokens"] == "2"


def test_durations_read_like_openais() -> None:
    assert [duration(s) for s in (0.02, 1.5, 17.28, 60, 360.4)] == [
        "20ms", "1.5s", "17.28s", "1m0s", "6m0s"
    ]  # fmt: skip


def test_expiry_accepts_durations_and_dates() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert expiry("30d", now) == now + timedelta(days=30)
    assert expiry("90m", now) == now + timedelta(minutes=90)
    assert expiry("2027-01-01", now) == datetime(2027, 1, 1, tzinfo=UTC)


# -- an edge with a key file -------------------------------------------------------------------


def _keys(*args: str) -> str:
    result = CliRunner().invoke(app, ["keys", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.json"


@pytest.fixture(scope="module")
def file_edge(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    _keys("create", "--tenant", "warmup", "--file", str(key_file))
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    with EdgeProcess(api_keys_file=key_file, policy_file=policy) as proc:
        yield proc


def _post(edge: EdgeProcess, secret: str | None, **headers: str) -> httpx.Response:
    if secret is not None:
        headers["authorization"] = f"Bearer {secret}"
    return httpx.post(f"{edge.base_url}/v1/chat/completions", json=HI, headers=headers, timeout=60)


def test_the_file_holds_hashes_and_bad_keys_get_openai_401s(
    file_edge: EdgeProcess, key_file: Path
) -> None:
    secret = _keys("create", "--tenant", "acme", "--file", str(key_file))
    assert secret not in key_file.read_text()
    expired, old = new_key("acme", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    write_key_file(key_file, [*read_key_file(key_file), old])
    deadline = time.monotonic() + 5
    while _post(file_edge, secret).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.2)  # the edge re-reads the file within a second of the change
    for authorization in ("", "Bearer", f"Bearer {secret}x", f"Bearer {expired}", secret):
        headers = {"authorization": authorization} if authorization else {}
        answer = _post(file_edge, None, **headers)
        assert answer.status_code == 401, answer.text
        error = answer.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    ok = file_edge.client(api_key=secret).chat.completions.create(**HI)
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        file_edge.client(api_key="tdm-000000000000-" + "x" * 32).models.list()


def test_the_tenant_is_the_keys_never_the_clients_header(
    file_edge: EdgeProcess, key_file: Path
) -> None:
    acme = _keys("create", "--tenant", "acme", "--file", str(key_file))
    gateway = _keys("create", "--tenant", "acme", "--may-set-tenant", "--file", str(key_file))
    time.sleep(1.5)  # one re-read of the file
    claims_other = _post(file_edge, acme, **{"x-tandem-tenant": "other"})
    assert claims_other.headers["x-tandem-rule"] == "tenant-acme"
    via_gateway = _post(file_edge, gateway, **{"x-tandem-tenant": "other"})
    assert via_gateway.headers["x-tandem-rule"] == "tenant-other"


def test_rate_limits_answer_429_with_openai_headers_per_key(
    file_edge: EdgeProcess, key_file: Path
) -> None:
    limited = _keys("create", "--tenant", "acme", "--rpm", "2", "--file", str(key_file))
    neighbour = _keys("create", "--tenant", "other", "--rpm", "50", "--file", str(key_file))
    time.sleep(1.5)
    first = _post(file_edge, limited)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert _post(file_edge, limited).status_code == 200
    refused = _post(file_edge, limited)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        file_edge.client(api_key=limited).chat.completions.create(**HI)
    # The neighbour's bucket is its own: nothing of the other key's use shows in it.
    other = _post(file_edge, neighbour)
    assert other.status_code == 200
    assert other.headers["x-ratelimit-remaining-requests"] == "49"


def test_a_streamed_answer_carries_the_headers_and_charges_its_tokens(
    file_edge: EdgeProcess, key_file: Path
) -> None:
    secret = _keys("create", "--tenant", "acme", "--tpm", "20", "--file", str(key_file))
    time.sleep(1.5)
    body = {**HI, "stream": True, "max_tokens": 8}
    headers = {"authorization": f"Bearer {secret}"}
    url = f"{file_edge.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-remaining-tokens"] == "20"
        assert "[DONE]" in answer.read().decode()
    # The prompt alone (the chat template) is over 20 tokens: the key waits now.
    held = _post(file_edge, secret)
    assert held.status_code == 429 and held.json()["error"]["type"] == "tokens"


def test_a_revoked_key_stops_working_within_seconds(file_edge: EdgeProcess, key_file: Path) -> None:
    secret = _keys("create", "--tenant", "acme", "--file", str(key_file))
    time.sleep(1.5)
    assert _post(file_edge, secret).status_code == 200
    key_id = secret.split("-")[1]
    assert "revoked key" in _keys("revoke", key_id, "--file", str(key_file))
    assert all(k.id != key_id for k in read_key_file(key_file))
    started = time.monotonic()
    while _post(file_edge, secret).status_code != 401:
        assert time.monotonic() - started < 5, "the revoked key still works"
        time.sleep(0.1)
    listed = json.loads(_keys("list", "--file", str(key_file), "-o", "json"))
    assert key_id not in {k["id"] for k in listed} and "sha256" not in listed[0]


# -- an edge following the mesh's keys --------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    identities: dict[str, Role] = {"operator": "operator", "edge-k": "edge"}
    return mesh_with(tmp_path_factory.mktemp("mesh"), identities)


@pytest.fixture(scope="module")
def hub(mesh: MeshDir) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(config=mesh.auth_conf) as server:
        yield server


@pytest.fixture(scope="module")
def mesh_edge(mesh: MeshDir, hub: EmbeddedNats) -> Iterator[EdgeProcess]:
    with EdgeProcess(
        nats_url=hub.url, node_id="edge-k", nats_creds=mesh.creds("edge-k"), mesh_api_keys=True
    ) as proc:
        yield proc


def _mesh_keys(mesh: MeshDir, hub: EmbeddedNats, *args: str) -> str:
    return _keys("--nats-creds", str(mesh.creds("operator")), *args, "--nats-url", hub.url)


def _until(predicate: object, timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - started


def test_mesh_keys_reach_the_edge_and_a_revocation_cuts_them_off(
    mesh: MeshDir, hub: EmbeddedNats, mesh_edge: EdgeProcess
) -> None:
    assert _post(mesh_edge, "tdm-000000000000-" + "x" * 32).status_code == 401
    secret = _mesh_keys(mesh, hub, "create", "--tenant", "acme", "--rpm", "100")
    _until(lambda: _post(mesh_edge, secret).status_code == 200)
    listed = json.loads(_mesh_keys(mesh, hub, "list", "-o", "json"))
    assert [k["tenant"] for k in listed] == ["acme"] and listed[0]["rpm"] == 100
    health = httpx.get(f"{mesh_edge.base_url}/health").json()["api_keys"]
    assert health == {"required": True, "shared_key": False, "source": "mesh", "keys": 1}
    _mesh_keys(mesh, hub, "revoke", secret)
    assert _until(lambda: _post(mesh_edge, secret).status_code == 401) < 5


def test_an_edge_cannot_write_the_key_bucket(mesh: MeshDir, hub: EmbeddedNats) -> None:
    result = CliRunner().invoke(
        app,
        ["keys", "--nats-creds", str(mesh.creds("edge-k")), "create", "--tenant", "mine",
         "--nats-url", hub.url],
    )  # fmt: skip
    assert result.exit_code != 0


def test_an_api_key_record_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        ApiKey.model_validate({"id": "x", "tenant": "t", "sha256": "0", "secret": "leak"})
