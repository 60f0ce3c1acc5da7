"""The Kubernetes connector against ``FakeScaleApiServer``: a FAKE Kubernetes API server.

No API server runs on these machines. The fake is a minimal in-process HTTP server
speaking the scale subresource of StatefulSets and Deployments (GET and PATCH
``.../<kind>/<name>/scale``), the pod list and pod patches: the public seam of the
official ``kubernetes`` client, which runs unmodified against it. It can refuse the
next patches (``fail_patches``) to test retries.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from nats.aio.client import Client

from cloud.planner import Planner
from cloud.planner_config import ConnectorError, PlannerConfig
from cloud.planner_connectors import DELETION_COST, KubernetesConnector
from mesh.connection import connect
from mesh.server import EmbeddedNats
from models.latency import LatencyProfile

kubernetes = pytest.importorskip("kubernetes")

pytestmark = pytest.mark.timeout(30)

_SCALE = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/(statefulsets|deployments)/([^/]+)/scale$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/?]+))?")


class FakeScaleApiServer:
    """A FAKE Kubernetes API server: scale subresources, pods; records every patch."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, str, str], int] = {}  # (ns, kind plural, name)
        self.pods: dict[str, dict[str, str]] = {}  # Deployment pods: name -> annotations
        self.patches: list[tuple[str, Any]] = []
        self.fail_patches = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if m := _SCALE.match(self.path):
                    self._send(200, fake.scale(m[1], m[2], m[3]))
                elif m := _PODS.match(self.path):
                    items = [
                        {"metadata": {"name": n, "namespace": m[1], "annotations": a}}
                        for n, a in sorted(fake.pods.items())
                    ]
                    self._send(
                        200, {"kind": "PodList", "apiVersion": "v1", "items": items, "metadata": {}}
                    )
                else:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.patches.append((self.path, body))
                if fake.fail_patches > 0:
                    fake.fail_patches -= 1
                    self._send(409, {"kind": "Status", "code": 409, "reason": "Conflict"})
                elif m := _SCALE.match(self.path):
                    fake.replicas[(m[1], m[2], m[3])] = int(body["spec"]["replicas"])
                    self._send(200, fake.scale(m[1], m[2], m[3]))
                elif (m := _PODS.match(self.path)) and m[2]:
                    fake.pods[m[2]].update(body["metadata"]["annotations"])
                    self._send(200, {"metadata": {"name": m[2], "namespace": m[1]}})
                else:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def scale(self, namespace: str, plural: str, name: str) -> dict[str, Any]:
        replicas = self.replicas.get((namespace, plural, name), 0)
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "selector": "app=tandem-worker"},
        }

    def __enter__(self) -> FakeScaleApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeScaleApiServer]:
    with FakeScaleApiServer() as server:
        yield server


def _connector(fake: FakeScaleApiServer, **kw: Any) -> KubernetesConnector:
    config = kubernetes.client.Configuration(host=fake.url)
    return KubernetesConnector(
        "tandem-worker", api_client=kubernetes.client.ApiClient(config), **kw
    )


async def test_a_statefulset_is_scaled_through_its_scale_subresource(
    fake_api: FakeScaleApiServer,
) -> None:
    fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] = 2
    k8s = _connector(fake_api)
    assert await k8s.workers() == ["tandem-worker-0", "tandem-worker-1"]
    assert await k8s.scale_up(2) == ["tandem-worker-2", "tandem-worker-3"]
    assert fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] == 4
    # A StatefulSet removes its highest ordinal: the only one the planner may pick.
    assert k8s.removable(["tandem-worker-0", "tandem-worker-3", "tandem-worker-1"]) == [
        "tandem-worker-3"
    ]
    with pytest.raises(ConnectorError, match="removes tandem-worker-3"):
        await k8s.drain("tandem-worker-1")
    await k8s.drain("tandem-worker-3")
    assert fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] == 3
    assert fake_api.patches[-1] == (
        "/apis/apps/v1/namespaces/tandem/statefulsets/tandem-worker/scale",
        {"spec": {"replicas": 3}},
    )


async def test_a_deployment_loses_the_pod_the_planner_chose(fake_api: FakeScaleApiServer) -> None:
    fake_api.replicas[("tandem", "deployments", "tandem-worker")] = 3
    fake_api.pods = {f"tandem-worker-abc{i}": {} for i in range(3)}
    k8s = _connector(fake_api, kind="Deployment")
    assert await k8s.workers() == ["tandem-worker-abc0", "tandem-worker-abc1", "tandem-worker-abc2"]
    await k8s.drain("tandem-worker-abc1")
    assert fake_api.pods["tandem-worker-abc1"] == {DELETION_COST: "-1000"}
    assert fake_api.pods["tandem-worker-abc0"] == {}
    assert fake_api.replicas[("tandem", "deployments", "tandem-worker")] == 2
    # The pod is marked before the replicas go down, so the ReplicaSet removes that one.
    assert [path.rsplit("/", 1)[-1] for path, _ in fake_api.patches] == [
        "tandem-worker-abc1",
        "scale",
    ]


async def test_dry_run_prints_the_patches_and_sends_none(fake_api: FakeScaleApiServer) -> None:
    fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] = 1
    printed: list[str] = []
    k8s = _connector(fake_api, dry_run=True, echo=printed.append)
    await k8s.scale_up(2)
    assert await k8s.workers() == [f"tandem-worker-{i}" for i in range(3)]  # as if applied
    assert fake_api.patches == []
    assert printed == [
        'PATCH StatefulSet tandem/tandem-worker/scale {"spec": {"replicas": 3}} (dry run)'
    ]


async def test_a_refused_patch_is_an_error_naming_the_workload(
    fake_api: FakeScaleApiServer,
) -> None:
    fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] = 1
    fake_api.fail_patches = 1
    with pytest.raises(
        ConnectorError, match=r"patching the scale of StatefulSet tandem/tandem-worker: 409"
    ):
        await _connector(fake_api).scale_up(1)


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, name="planner-k8s-test")
    yield client
    await client.close()


async def test_failed_scale_ups_are_retried_with_backoff_up_to_the_minimum(
    fake_api: FakeScaleApiServer, nc: Client
) -> None:
    """The fleet fell below its minimum (1 of 3); the API refuses three patches."""
    fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] = 1
    fake_api.fail_patches = 3
    now = [1000.0]
    config = PlannerConfig.model_validate({"bounds": {"min_replicas": 3, "max_replicas": 5}})
    planner = Planner(
        nc, f"k8s-{uuid.uuid4().hex[:6]}", _connector(fake_api),
        profile=LatencyProfile.default().cloud, config=config, clock=lambda: now[0],
    )  # fmt: skip
    await planner.start()
    try:
        seen = []
        for t in (0, 0.5, 1.0, 2.0, 3.0, 4.0, 7.0, 7.5):  # seconds after the first failure
            now[0] = 1000.0 + t
            decision = await planner.tick()
            seen.append((t, decision.action))
            assert decision.provisioned >= 1  # never fewer than the fleet had
    finally:
        await planner.stop()
    # Failures at 0, 1 and 3 (backoff 1 s, 2 s, 4 s), then the patch lands at 7.
    assert seen == [
        (0, "error"), (0.5, "hold"), (1.0, "error"), (2.0, "hold"),
        (3.0, "error"), (4.0, "hold"), (7.0, "scale_up"), (7.5, "hold"),
    ]  # fmt: skip
    assert fake_api.replicas[("tandem", "statefulsets", "tandem-worker")] == 3
    errors = [d for d in planner.decisions if d.action == "error"]
    assert all("409" in (d.error or "") and d.target == 1 for d in errors)
