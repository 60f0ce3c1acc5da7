"""Creating the mesh's JetStream KV buckets: replicated where the hub is a cluster.

The policy, API-key and usage buckets are created on first use (``router.store``,
``edge.api_keys``, ``edge.fleet_usage``). On a NATS cluster (the Kubernetes base runs
three servers) a bucket with one replica lives on one server's disk and is gone while
that server restarts, so buckets ask for ``REPLICAS`` first; a single server refuses
more than one (JetStream error 10074) and gets one.
"""

from __future__ import annotations

from dataclasses import replace

from nats.js import JetStreamContext, api
from nats.js.errors import APIError
from nats.js.kv import KeyValue

REPLICAS = 3  # JetStream's usual quorum: one server may be down
_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"


async def create_bucket(js: JetStreamContext, config: api.KeyValueConfig) -> KeyValue:
    """Create ``config``'s bucket with ``REPLICAS`` replicas, or one on a single server."""
    try:
        return await js.create_key_value(replace(config, replicas=REPLICAS))
    except APIError as exc:
        if exc.err_code != _NOT_CLUSTERED:
            raise
    return await js.create_key_value(replace(config, replicas=1))
