"""Rendering and validating the Kubernetes manifests (``deploy/k8s``) for the deploy tests.

``render`` runs ``kubectl kustomize`` (offline: kubectl's built-in Kustomize) and
``schema_errors`` checks objects with ``kubernetes-validate`` against the schemas of
``K8S_VERSION``, strictly (an unknown field, such as a misspelled one, is an error).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("monolithic", "hybrid", "disaggregated")
# The Kubernetes version the manifests are validated against (kubectl here is 1.32).
K8S_VERSION = "1.32"

KUBECTL = shutil.which("kubectl")
requires_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: the Kustomize overlays cannot be rendered"
)

Obj = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


class RenderError(Exception):
    """``kubectl kustomize`` refused a kustomization; the message is its own."""


def render(path: Path) -> list[Obj]:
    """Every object ``kubectl kustomize path`` renders."""
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {done.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def schema_errors(objects: list[Obj], version: str = K8S_VERSION) -> list[str]:
    """One line per object that the Kubernetes ``version`` schema rejects."""
    import kubernetes_validate

    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            errors.append(f"{ident(obj)}: {where}: {exc.message}")
    return errors


def ident(obj: Obj) -> str:
    """``Kind/name``, for messages."""
    return f"{obj['kind']}/{obj['metadata']['name']}"


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    """The one object of ``kind`` called ``name`` (ConfigMaps: its hash suffix ignored)."""
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (o["metadata"]["name"] == name or o["metadata"]["name"].startswith(f"{name}-"))
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {[ident(o) for o in found]}"
    return found[0]


def of_kind(objects: list[Obj], *kinds: str) -> list[Obj]:
    """The objects of these kinds."""
    return [o for o in objects if o["kind"] in kinds]


def pod_spec(workload: Obj) -> Obj:
    """A workload's pod spec."""
    return dict(workload["spec"]["template"]["spec"])


def pod_labels(workload: Obj) -> dict[str, str]:
    """The labels of a workload's pods."""
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def containers(workload: Obj) -> Iterator[Obj]:
    """A workload's containers (init containers too)."""
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env(container: Obj) -> dict[str, str]:
    """A container's plain environment variables (valueFrom ones map to '')."""
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether ``matchLabels`` ``selector`` selects ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


def workers(objects: list[Obj]) -> list[Obj]:
    """The cloud worker pools (their pods have component=worker)."""
    return [
        w
        for w in of_kind(objects, *WORKLOAD_KINDS)
        if pod_labels(w).get("app.kubernetes.io/component") == "worker"
    ]
