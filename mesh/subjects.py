"""NATS subject names: the only place they are spelled.

Every subject starts with ``PREFIX`` (versioned, so a v2 mesh can run beside v1). Ids and
model names become single subject tokens through ``token``, which keeps them readable and
unambiguous even when they contain dots or slashes (``HuggingFaceTB/SmolLM2-135M``).
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "tandem.v1"
POLICY_BUCKET = "tandem_policy"
POLICY_KEY = "active"  # the one live routing policy in POLICY_BUCKET
API_KEYS_BUCKET = "tandem_api_keys"  # the edge API's keys, one entry per key (hashes only)
USAGE_BUCKET = "tandem_usage"  # fleet-wide cloud tokens per tenant and hour
# The fleet planner's bucket (cloud.planner_config): per pool, its configuration
# ("config.<pool>", edited like the policy) and its lease ("lease.<pool>").
PLANNER_BUCKET = "tandem_planner"
# The hub's JetStream domain (the policy, keys and usage buckets live there). A leaf node
# runs no JetStream and reaches it as $JS.<domain>.API (mesh.leaf): nats-server never
# carries the plain $JS.API across a leaf link of an ordinary account.
HUB_JS_DOMAIN = "hub"

_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_-]")
# Dot-separated non-empty tokens without wildcards or whitespace.
_SUBJECT = re.compile(r"[^.*>\s]+(\.[^.*>\s]+)*")
_HASH_CHARS = 8


def token(value: str) -> str:
    """Map ``value`` to one safe subject token (``[A-Za-z0-9_-]+``), deterministically.

    A safe value is returned as is. Otherwise unsafe characters become ``_`` and a short
    hash of the original is appended, so ``a.b`` and ``a/b`` get different tokens.
    """
    if not value:
        raise ValueError("a subject token cannot be empty")
    if _SAFE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:_HASH_CHARS]
    return f"{_UNSAFE_CHAR.sub('_', value)}_{digest}"


def node_load(node_id: str) -> str:
    """Where node ``node_id`` publishes its heartbeats (``NodeHeartbeat``)."""
    return f"{PREFIX}.nodes.{token(node_id)}.load"


def all_node_loads() -> str:
    """Wildcard over every node's heartbeat subject."""
    return f"{PREFIX}.nodes.*.load"


def cloud_generate(model: str) -> str:
    """Queue-group subject of cloud workers generating with ``model``."""
    return f"{PREFIX}.cloud.{token(model)}.generate"


def cloud_verify(model: str) -> str:
    """Queue-group subject of cloud workers verifying drafts against ``model``."""
    return f"{PREFIX}.cloud.{token(model)}.verify"


def cloud_prefill(model: str) -> str:
    """Queue-group subject of the prefill workers of ``model``: a decode worker asks one to
    compute a prompt's KV (``PrefillRequest``); edges never publish here (``mesh.security``)."""
    return f"{PREFIX}.cloud.{token(model)}.prefill"


def cloud_cancel(model: str, node_id: str) -> str:
    """Where node ``node_id`` broadcasts its ``CancelRequest``s to the workers of ``model``.

    The sender's token is part of the subject so that the hub enforces who sent a
    cancel (an edge may publish only its own, ``mesh.security``); a worker honours it
    only for a request whose stream goes to that node's inbox (``inbox_owner``).
    """
    return f"{PREFIX}.cloud.{token(model)}.cancel.{token(node_id)}"


def cancel_sender(subject: str) -> str:
    """The sender's token of a ``cloud_cancel`` subject."""
    return subject.rpartition(".")[2]


def inbox_owner(subject: str) -> str | None:
    """The node token of an inbox subject, ``_INBOX.<node>...`` (None if not an inbox).

    Every node's inboxes sit under ``_INBOX.<its name>`` (``mesh.security.inbox_prefix``),
    and on a secured mesh only that node may read them: a stream to ``_INBOX.x...`` is
    node x's."""
    parts = subject.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "_INBOX" and parts[1] else None


LIVENESS_SUFFIX = ".alive"


def liveness(reply_subject: str) -> str:
    """The requester's "still there?" subject beside a stream's ``reply_subject``.

    It sits under the reply subject (an inbox) so a requester allowed its own inbox
    needs no further permission to answer it.
    """
    if not _SUBJECT.fullmatch(reply_subject):
        raise ValueError(f"not a plain subject (no wildcards or spaces): {reply_subject!r}")
    return f"{reply_subject}{LIVENESS_SUFFIX}"


def worker(worker_id: str, verb: str) -> str:
    """Subject of one worker (session affinity), e.g. ``tandem.v1.worker.w1.generate``."""
    return f"{PREFIX}.worker.{token(worker_id)}.{token(verb)}"


def cloud_service_name(model: str) -> str:
    """NATS micro service name of the cloud workers for ``model`` (``[A-Za-z0-9_-]`` only)."""
    return f"tandem-cloud-{token(model)}"


def policy_applied() -> str:
    """Where edges report each policy revision they applied (or refused)."""
    return f"{PREFIX}.policy.applied"


def planner_decisions(pool: str) -> str:
    """Where the planner of ``pool`` publishes every decision (``PlannerDecision``)."""
    return f"{PREFIX}.planner.{token(pool)}.decision"


def all_planner_decisions() -> str:
    """Wildcard over every pool's planner decisions (``tandem status``)."""
    return f"{PREFIX}.planner.*.decision"


def sim_fleet_host(host_id: str) -> str:
    """Control subject of a simulated fleet host of a scale run (bench/planner_bench.py):
    it starts and drains simulated workers on request. Never on a production mesh."""
    return f"{PREFIX}.simfleet.{token(host_id)}.control"


# -- wildcards, for permissions (mesh.security) -------------------------------------------


def cloud_any(verb: str) -> str:
    """``verb`` (generate, verify) for every model: ``tandem.v1.cloud.*.<verb>``."""
    return f"{PREFIX}.cloud.*.{token(verb)}"


def cloud_cancels(*, model: str | None = None, node_id: str | None = None) -> str:
    """Cancels of ``model`` from ``node_id``, each one every model or node when None:
    ``tandem.v1.cloud.<model or *>.cancel.<node or *>``."""
    model_token = "*" if model is None else token(model)
    node_token = "*" if node_id is None else token(node_id)
    return f"{PREFIX}.cloud.{model_token}.cancel.{node_token}"


def worker_any(verb: str) -> str:
    """``verb`` of every worker's affinity subjects: ``tandem.v1.worker.*.<verb>``."""
    return f"{PREFIX}.worker.*.{token(verb)}"


def worker_all(worker_id: str) -> str:
    """Every affinity subject of one worker: ``tandem.v1.worker.<id>.>``."""
    return f"{PREFIX}.worker.{token(worker_id)}.>"


# -- edge-local subjects (mesh.leaf) ------------------------------------------------------


def local(topic: str) -> str:
    """An edge-local subject, ``tandem.v1.local.<topic>``: it never leaves the edge's own
    leaf node (its deny_imports/deny_exports), so it works through a WAN outage."""
    return f"{PREFIX}.local.{token(topic)}"


def local_any() -> str:
    """Every edge-local subject: ``tandem.v1.local.>``."""
    return f"{PREFIX}.local.>"
