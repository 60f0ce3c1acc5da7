"""The Kubernetes manifests (``deploy/k8s``): every overlay renders, validates against the
Kubernetes schema of ``K8S_VERSION``, and holds together the way an operator expects.

Rendering is ``kubectl kustomize``, offline; nothing here needs a cluster. What only a
real cluster can show (scheduling on GPUs, the CNI enforcing the NetworkPolicies, the
kubelet probing and stopping a worker pod) is listed in docs/deploy.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cloud.settings import CloudSettings
from mesh import subjects
from mesh.server import find_nats_server
from router.policy import RoutingPolicy
from tests.deploy.manifests import (
    K8S,
    OVERLAYS,
    WORKLOAD_KINDS,
    Obj,
    RenderError,
    containers,
    env,
    ident,
    matches,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    requires_kubectl,
    schema_errors,
    workers,
)

pytestmark = [requires_kubectl, pytest.mark.timeout(60)]

WORKER_HTTP_PORT = 8081  # the worker's HTTP port (settings field http_port), by default
# Secrets the operator creates from `tandem mesh` output (docs/deploy.md), per overlay.
SECRETS = {
    "monolithic": {"tandem-nats-users", "tandem-worker-seeds"},
    "disaggregated": {"tandem-nats-users", "tandem-worker-seeds"},
    "hybrid": {
        "tandem-nats-users", "tandem-worker-seeds", "tandem-nats-tls", "tandem-operator-seed"
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every overlay, rendered once."""
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- render and schema ------------------------------------------------------------------------


def test_every_overlay_renders_valid_objects(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert schema_errors(objects) == []
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "tandem"
    }


def test_a_schema_error_is_reported() -> None:
    """The validator is not vacuous: a wrong type and an unknown field are both caught."""
    bad = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "x"},
        "spec": {"minAvailable": 1, "selectr": {}},
    }
    assert len(schema_errors([bad])) == 1


# -- a malformed overlay parameter fails the render test, not a cluster -------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scratch copy of deploy/k8s to break."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_broken_kustomization_fails_the_render_with_kustomizes_message(tree: Path) -> None:
    overlay = tree / "overlays" / "monolithic"
    _edit(overlay / "kustomization.yaml", "patches:", "replicas:\n  - name: tandem-worker\n"
          "    count: many\npatches:")  # fmt: skip
    with pytest.raises(RenderError) as err:
        render(overlay)
    assert "Replica.replicas.count of type int64" in str(err.value)


def test_a_patch_naming_no_resource_fails_the_render(tree: Path) -> None:
    overlay = tree / "overlays" / "monolithic"
    _edit(overlay / "pool.yaml", "name: tandem-worker\n", "name: tandem-workers\n")
    with pytest.raises(RenderError) as err:
        render(overlay)
    assert "no matches for Id StatefulSet.v1.apps/tandem-workers" in str(err.value)


def test_a_mistyped_value_fails_schema_validation(tree: Path) -> None:
    """Kustomize merges ``replicas: four`` as given; the schema check names the field."""
    overlay = tree / "overlays" / "monolithic"
    _edit(overlay / "pool.yaml", "replicas: 4", "replicas: four")
    errors = schema_errors(render(overlay))
    assert len(errors) == 1
    assert errors[0].startswith("StatefulSet/tandem-worker: spec/replicas: 'four'")


def test_tensor_parallel_without_the_gpus_fails_the_checks(tree: Path) -> None:
    overlay = tree / "overlays" / "monolithic"
    _edit(overlay / "pool.yaml", 'TENSOR_PARALLEL_SIZE\n              value: "1"',
          'TENSOR_PARALLEL_SIZE\n              value: "2"')  # fmt: skip
    problems = _tensor_parallel_problems(render(overlay))
    assert problems == ["StatefulSet/tandem-worker: tensor parallel 2 on 1 GPU(s)"]


# -- workloads --------------------------------------------------------------------------------


def test_every_container_has_resources_and_long_running_ones_probes(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    missing = []
    for workload in of_kind(rendered[overlay], *WORKLOAD_KINDS):
        for c in containers(workload):
            where = f"{ident(workload)}/{c['name']}"
            resources = c.get("resources", {})
            if "memory" not in resources.get("requests", {}) or "cpu" not in resources.get(
                "requests", {}
            ):
                missing.append(f"{where}: cpu/memory requests")
            if "memory" not in resources.get("limits", {}):
                missing.append(f"{where}: memory limit")
            if workload["kind"] != "Job":  # a Job's container runs to completion
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if probe not in c:
                        missing.append(f"{where}: {probe}")
            if c["image"].endswith(":latest") or ":" not in c["image"]:
                missing.append(f"{where}: an unpinned image {c['image']}")
    assert missing == []


def test_pods_run_as_non_root_without_privileges(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    for workload in of_kind(rendered[overlay], *WORKLOAD_KINDS):
        assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True, ident(workload)
        for c in containers(workload):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, ident(workload)
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], ident(workload)


def _drain_s(container: Obj) -> float:
    value = env(container).get("TANDEM_CLOUD_DRAIN_TIMEOUT_S")
    default = CloudSettings.model_fields["drain_timeout_s"].default
    return float(value) if value else float(default)


def _pre_stop_wait_s(container: Obj) -> float:
    """How long the worker's preStop waits after starting the drain (its ``sleep N``)."""
    (shell, flag, script) = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    (wait,) = re.findall(r"\bsleep (\d+(?:\.\d+)?)\b", script)
    return float(wait)


def test_worker_prestop_starts_the_drain(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """The preStop stops taking work: it sends the worker the SIGTERM that drains it."""
    for pool in workers(rendered[overlay]):
        spec = pod_spec(pool)
        (worker,) = spec["containers"]
        script = worker["lifecycle"]["preStop"]["exec"]["command"][2]
        # The drain starts first, then a short wait: SIGTERM to PID 1 ...
        assert re.match(r"kill -TERM 1; sleep \d+$", script), script
        # ... which is the worker: the image's exec-form ENTRYPOINT (tests/deploy/
        # test_docker.py), not replaced by a `command`, and no shared process namespace
        # (where PID 1 would be the pod's pause process).
        assert "command" not in worker, ident(pool)
        assert not spec.get("shareProcessNamespace", False), ident(pool)


def test_worker_grace_period_outlasts_prestop_and_drain(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    pools = workers(rendered[overlay])
    assert pools
    for pool in pools:
        (worker,) = pod_spec(pool)["containers"]
        pre_stop = _pre_stop_wait_s(worker)
        grace = pod_spec(pool)["terminationGracePeriodSeconds"]
        # The preStop starts the drain and the kubelet's SIGTERM follows it. Counted one
        # after the other, as if the drain began only after the preStop (a bound that
        # holds either way); the engine's shutdown gets what is left.
        assert grace >= pre_stop + _drain_s(worker) + 15, ident(pool)
        assert pre_stop <= 5, "the preStop holds the pod; the drain needs no long wait"


def test_worker_settings_are_real_settings(rendered: dict[str, list[Obj]], overlay: str) -> None:
    fields = {f"TANDEM_CLOUD_{name.upper()}" for name in CloudSettings.model_fields}
    for pool in workers(rendered[overlay]):
        (worker,) = pod_spec(pool)["containers"]
        values = {k: v for k, v in env(worker).items() if k.startswith("TANDEM_CLOUD_")}
        # pydantic-settings silently ignores an unknown TANDEM_CLOUD_* variable, so a
        # misspelled knob would otherwise do nothing.
        unknown = set(values) - fields
        assert unknown == set(), f"{ident(pool)} sets variables the worker ignores: {unknown}"
        given = {
            k.removeprefix("TANDEM_CLOUD_").lower(): v for k, v in values.items() if k in fields
        }
        CloudSettings.model_validate(given)  # raises on a value the worker would refuse at start
        assert given["worker_id"] == "$(POD_NAME)"
        # The identity's name is the seed file's stem and must be the worker id.
        assert Path(given["nats_creds"]).name == "$(POD_NAME).nk"
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        volume = mounts[str(Path(given["nats_creds"]).parent)]
        volumes = {v["name"]: v for v in pod_spec(pool)["volumes"]}
        assert volumes[volume]["secret"]["secretName"] == "tandem-worker-seeds"
        assert given["nats_url"] == "nats://tandem-nats:4222"


def test_worker_probes_and_scrape_use_the_http_endpoint(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    for pool in workers(rendered[overlay]):
        (worker,) = pod_spec(pool)["containers"]
        port = int(env(worker).get("TANDEM_CLOUD_HTTP_PORT", WORKER_HTTP_PORT))
        # The kubelet and Prometheus reach the pod's address, not its loopback (the default).
        assert env(worker).get("TANDEM_CLOUD_HTTP_HOST") == "0.0.0.0"
        named_ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
        paths = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = worker[probe]["httpGet"]
            assert named_ports.get(get["port"], get["port"]) == port
            paths[probe] = get["path"]
        assert paths == {"startupProbe": "/health", "livenessProbe": "/health",
                         "readinessProbe": "/ready"}  # fmt: skip
        notes = pool["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port
        assert notes["prometheus.io/path"] == "/metrics"
        assert worker["args"] == ["cloud", "serve"]


def _tensor_parallel_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for pool in workers(objects):
        (worker,) = pod_spec(pool)["containers"]
        tp = int(env(worker)["TANDEM_CLOUD_TENSOR_PARALLEL_SIZE"])
        gpus = {int(worker["resources"][k]["nvidia.com/gpu"]) for k in ("requests", "limits")}
        if gpus != {tp}:
            problems.append(f"{ident(pool)}: tensor parallel {tp} on {min(gpus)} GPU(s)")
    return problems


def test_tensor_parallel_size_equals_the_pods_gpus(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    assert _tensor_parallel_problems(rendered[overlay]) == []


def test_disaggregated_has_a_prefill_and_a_decode_pool(rendered: dict[str, list[Obj]]) -> None:
    pools = workers(rendered["disaggregated"])
    roles = {}
    for pool in pools:
        (worker,) = pod_spec(pool)["containers"]
        roles[pool["metadata"]["name"]] = (
            env(worker)["TANDEM_CLOUD_ROLE"], pod_labels(pool)["tandem.io/pool"]
        )  # fmt: skip
    assert roles == {
        "tandem-worker-prefill": ("prefill", "prefill"),
        "tandem-worker-decode": ("decode", "decode"),
    }


def test_disaggregated_pools_share_one_connector_and_its_storage(
    rendered: dict[str, list[Obj]],
) -> None:
    """Prefill and decode workers name the same connector and extra config, and
    ExampleConnector's shared_storage_path is the one ReadWriteMany claim in every pod."""
    objects = rendered["disaggregated"]
    configs = set()
    for pool in workers(objects):
        (worker,) = pod_spec(pool)["containers"]
        settings = CloudSettings.model_validate(
            {k.removeprefix("TANDEM_CLOUD_").lower(): v for k, v in env(worker).items()
             if k.startswith("TANDEM_CLOUD_")}
        )  # fmt: skip
        assert settings.kv_connector == "ExampleConnector", ident(pool)
        configs.add(json.dumps(settings.kv_connector_extra_config, sort_keys=True))
        path = settings.kv_connector_extra_config["shared_storage_path"]
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(pool)["volumes"]}
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == "tandem-kv-shared"
    assert len(configs) == 1, configs
    claim = named(objects, "PersistentVolumeClaim", "tandem-kv-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# -- selectors, references --------------------------------------------------------------------


def test_selectors_match_the_pods_they_mean(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    loads = of_kind(objects, *WORKLOAD_KINDS)
    pods = {ident(w): pod_labels(w) for w in loads}

    def selected(selector: dict[str, str]) -> set[str]:
        return {name for name, labels in pods.items() if matches(selector, labels)}

    for w in of_kind(objects, "Deployment", "StatefulSet"):
        assert matches(w["spec"]["selector"]["matchLabels"], pod_labels(w)), ident(w)
        # No two workloads' selectors overlap (each pod has one owner).
        assert selected(w["spec"]["selector"]["matchLabels"]) == {ident(w)}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        owners = selected(pdb["spec"]["selector"]["matchLabels"])
        assert len(owners) == 1, f"{ident(pdb)} selects {owners}"
    for svc in of_kind(objects, "Service"):
        assert selected(svc["spec"]["selector"]), f"{ident(svc)} selects no pods"
    for policy in of_kind(objects, "NetworkPolicy"):
        assert selected(policy["spec"]["podSelector"]["matchLabels"]), ident(policy)
        rules = policy["spec"].get("ingress", []) + policy["spec"].get("egress", [])
        for rule in rules:
            for peer in rule.get("from", []) + rule.get("to", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selected(peer["podSelector"]["matchLabels"]), ident(policy)


def test_statefulsets_have_their_headless_service(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    for sts in of_kind(objects, "StatefulSet"):
        svc = named(objects, "Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None"
        assert matches(svc["spec"]["selector"], pod_labels(sts))


def test_referenced_configmaps_exist_and_secrets_are_the_documented_ones(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objects = rendered[overlay]
    maps = {o["metadata"]["name"] for o in of_kind(objects, "ConfigMap")}
    secrets = set()
    for w in of_kind(objects, *WORKLOAD_KINDS):
        for volume in pod_spec(w).get("volumes", []):
            sources = volume.get("projected", {}).get("sources", [volume])
            for source in sources:
                if "configMap" in source:
                    assert source["configMap"]["name"] in maps, ident(w)
                if "secret" in source:
                    secrets.add(source["secret"].get("secretName") or source["secret"]["name"])
    assert secrets == SECRETS[overlay]
    assert not of_kind(objects, "Secret"), "credentials never live in the manifests"


# -- NATS -------------------------------------------------------------------------------------


def test_nats_cluster_shape(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    nats = named(objects, "StatefulSet", "tandem-nats")
    assert nats["spec"]["replicas"] == 3
    assert [t["metadata"]["name"] for t in nats["spec"]["volumeClaimTemplates"]] == ["data"]
    (container,) = pod_spec(nats)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "leafnodes": 7422, "monitor": 8222}
    conf = named(objects, "ConfigMap", "tandem-nats-config")["data"]["nats.conf"]
    assert re.search(rf'domain: "{subjects.HUB_JS_DOMAIN}"', conf)
    assert named(objects, "PodDisruptionBudget", "tandem-nats")["spec"]["minAvailable"] == 2
    # The image runs the nats-server version these tests boot the config with.
    version = subprocess.run(
        [str(find_nats_server()), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert container["image"] == f"nats:{version.lstrip('v')}-alpine"


def test_hybrid_exposes_only_the_leaf_port_and_loads_the_policy(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["hybrid"]
    leaf = named(objects, "Service", "tandem-nats-leaf")
    assert leaf["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in leaf["spec"]["ports"]] == [7422]
    exposed = [s for s in of_kind(objects, "Service") if s["spec"].get("type") == "LoadBalancer"]
    assert exposed == [leaf]
    conf = named(objects, "ConfigMap", "tandem-nats-config")["data"]["leafnodes.conf"]
    assert "tls {" in conf
    job = named(objects, "Job", "tandem-policy-load")
    (c,) = pod_spec(job)["containers"]
    assert c["args"][:4] == ["policy", "set", "-f", "/policy/policy.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    policy_map = volumes[mounts["/policy"]]["configMap"]["name"]
    text = named(objects, "ConfigMap", policy_map)["data"]["policy.yaml"]
    RoutingPolicy.from_yaml(text)  # the policy the Job stores is a valid one
    assert pod_labels(job)["tandem.io/nats-client"] == "true"  # NetworkPolicy admits it


def test_other_overlays_expose_nothing(rendered: dict[str, list[Obj]]) -> None:
    for overlay in ("monolithic", "disaggregated"):
        types = {s["spec"].get("type", "ClusterIP") for s in of_kind(rendered[overlay], "Service")}
        assert types == {"ClusterIP"}
