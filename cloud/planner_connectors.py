"""Connectors of the fleet planner: where replicas come from and go to.

- ``LocalConnector``: worker processes on this machine. It is handed a ``spawn``
  function (``tandem.commands.planner.local_spawner`` starts ``tandem cloud serve``
  through the project's process supervisor, ``--engine sim`` for scale runs): ``cloud/``
  does not import ``tandem/``. Draining is the worker's own SIGTERM drain.
- ``KubernetesConnector``: a Deployment's or StatefulSet's replicas through the scale
  subresource, with the official ``kubernetes`` client (extra ``planner``). A Deployment
  removes the pod the planner chose: it is marked with the lowest
  ``controller.kubernetes.io/pod-deletion-cost`` first. A StatefulSet always removes its
  highest ordinal, so that is the only removable worker. The pods' SIGTERM drain (and
  their ``terminationGracePeriodSeconds``) finishes in-flight requests. ``dry_run``
  prints each patch and sends nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import Any, Literal, Protocol

from cloud.planner_config import ConnectorError

logger = logging.getLogger(__name__)

__all__ = ["KubernetesConnector", "LocalConnector", "LocalWorker"]

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class LocalWorker(Protocol):
    """A worker process the local connector runs (``tandem.local.WorkerProcess`` is one)."""

    worker_id: str

    @property
    def alive(self) -> bool: ...

    def terminate(self, grace_s: float | None = None) -> int: ...


class LocalConnector:
    """Starts and drains worker processes on this machine through ``spawn(worker_id)``."""

    def __init__(self, spawn: Callable[[str], LocalWorker], *, prefix: str = "worker") -> None:
        self._spawn = spawn
        self._prefix = prefix
        self._next = 0
        self._workers: dict[str, LocalWorker] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self.drained: list[tuple[str, int]] = []  # (worker id, exit code), oldest first

    async def workers(self) -> list[str]:
        """Workers alive and not being drained."""
        for worker_id in [w for w, p in self._workers.items() if not p.alive]:
            logger.warning("local worker %s exited on its own", worker_id)
            del self._workers[worker_id]
        return sorted(self._workers)

    async def scale_up(self, count: int) -> list[str]:
        """Start ``count`` processes (not waiting for them: readiness is their heartbeat)."""
        started = []
        for _ in range(count):
            worker_id = f"{self._prefix}-{self._next}"
            self._next += 1
            try:
                self._workers[worker_id] = await asyncio.to_thread(self._spawn, worker_id)
            except Exception as exc:
                raise ConnectorError(f"cannot start local worker {worker_id}: {exc}") from exc
            started.append(worker_id)
        return started

    async def drain(self, worker_id: str) -> None:
        """SIGTERM ``worker_id`` (it drains); it leaves ``workers()`` at once."""
        process = self._workers.pop(worker_id, None)
        if process is None:
            raise ConnectorError(f"no local worker {worker_id}")
        task = asyncio.create_task(self._terminate(worker_id, process), name=f"drain {worker_id}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _terminate(self, worker_id: str, process: LocalWorker) -> None:
        code = await asyncio.to_thread(process.terminate)
        self.drained.append((worker_id, code))
        logger.info("local worker %s drained and exited (%d)", worker_id, code)

    def removable(self, worker_ids: list[str]) -> list[str]:
        """Any local worker can be drained."""
        return list(worker_ids)

    async def wait_drained(self) -> None:
        """Until every drain begun has finished (tests and benches)."""
        while self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)

    async def close(self) -> None:
        """Drain every worker still running (a local run ends with its planner)."""
        for worker_id in list(self._workers):
            await self.drain(worker_id)
        await self.wait_drained()


Kind = Literal["StatefulSet", "Deployment"]
_ORDINAL = re.compile(r"^(?P<name>.+)-(?P<ordinal>\d+)$")


class KubernetesConnector:
    """Scales a Deployment or StatefulSet through the scale subresource (see module doc)."""

    def __init__(
        self,
        name: str,
        *,
        namespace: str = "tandem",
        kind: Kind = "StatefulSet",
        dry_run: bool = False,
        api_client: Any = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        """``api_client``: a ``kubernetes.client.ApiClient`` (default: kubeconfig or in-cluster)."""
        try:
            from kubernetes import client, config
        except ImportError as exc:
            raise ConnectorError(
                "the Kubernetes connector needs: pip install 'tandem-mesh[planner]'"
            ) from exc
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as exc:
                    raise ConnectorError(f"no Kubernetes API configured: {exc}") from exc
            api_client = client.ApiClient()
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._exception = client.ApiException
        self.name, self.namespace, self.kind, self.dry_run = name, namespace, kind, dry_run
        self._echo = echo
        self._replicas: int | None = None  # dry run: what the patches would have set

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except self._exception as exc:
            raise ConnectorError(
                f"{what} of {self.kind} {self.namespace}/{self.name}: {exc.status} {exc.reason}"
            ) from exc
        except OSError as exc:  # urllib3's connection errors are OSErrors
            raise ConnectorError(
                f"{what} of {self.kind} {self.namespace}/{self.name}: {exc}"
            ) from exc

    async def _scale(self) -> Any:
        read = (
            self._apps.read_namespaced_stateful_set_scale
            if self.kind == "StatefulSet"
            else self._apps.read_namespaced_deployment_scale
        )
        return await self._call("reading the scale", read, self.name, self.namespace)

    async def _set_replicas(self, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        if self.dry_run:
            self._echo(
                f"PATCH {self.kind} {self.namespace}/{self.name}/scale {json.dumps(body)} (dry run)"
            )
            self._replicas = replicas
            return
        patch = (
            self._apps.patch_namespaced_stateful_set_scale
            if self.kind == "StatefulSet"
            else self._apps.patch_namespaced_deployment_scale
        )
        await self._call("patching the scale", patch, self.name, self.namespace, body)

    async def _current(self) -> tuple[int, str | None]:
        scale = await self._scale()
        replicas = int(scale.spec.replicas or 0)
        if self.dry_run and self._replicas is not None:
            replicas = self._replicas
        return replicas, getattr(scale.status, "selector", None)

    async def workers(self) -> list[str]:
        """The pods the scale asks for (worker id = pod name, as deploy/k8s sets it)."""
        replicas, selector = await self._current()
        if self.kind == "StatefulSet":
            return [f"{self.name}-{i}" for i in range(replicas)]
        pods = await self._call(
            "listing the pods",
            self._core.list_namespaced_pod,
            self.namespace,
            label_selector=selector or "",
        )
        names = sorted(p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None)
        return names[:replicas] if len(names) > replicas else names

    async def scale_up(self, count: int) -> list[str]:
        """Raise replicas by ``count``; a StatefulSet's new pods' names are known."""
        replicas, _ = await self._current()
        await self._set_replicas(replicas + count)
        if self.kind == "StatefulSet":
            return [f"{self.name}-{i}" for i in range(replicas, replicas + count)]
        return []  # a Deployment's pods get random names: the heartbeats tell

    async def drain(self, worker_id: str) -> None:
        """Lower replicas by one, making ``worker_id`` the pod that goes."""
        replicas, _ = await self._current()
        if self.kind == "StatefulSet":
            if worker_id != f"{self.name}-{replicas - 1}":
                raise ConnectorError(
                    f"a StatefulSet removes {self.name}-{replicas - 1}, not {worker_id}"
                )
        else:
            body = {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
            if self.dry_run:
                self._echo(f"PATCH Pod {self.namespace}/{worker_id} {json.dumps(body)} (dry run)")
            else:
                await self._call(
                    "marking the pod to remove",
                    self._core.patch_namespaced_pod,
                    worker_id,
                    self.namespace,
                    body,
                )
        await self._set_replicas(max(0, replicas - 1))

    def removable(self, worker_ids: list[str]) -> list[str]:
        """A StatefulSet removes its highest ordinal only; a Deployment any pod."""
        if self.kind != "StatefulSet":
            return list(worker_ids)
        ordinals = {}
        for worker_id in worker_ids:
            match = _ORDINAL.match(worker_id)
            if match and match["name"] == self.name:
                ordinals[int(match["ordinal"])] = worker_id
        return [ordinals[max(ordinals)]] if ordinals else []
