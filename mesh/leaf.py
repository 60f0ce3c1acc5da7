"""Edges as NATS leaf nodes: the hub's ``leafnodes`` block and an edge device's own server.

An edge device may run a nats-server of its own, a *leaf node* of the hub (the pattern
NATS recommends for edge fleets). The edge and its local tools talk to it on loopback;
it carries to the hub what the edge's permissions allow, and keeps ``subjects.local_any()``
on the device, so edge-local request/reply goes on through a WAN outage. ``MeshDir``
(``mesh.security``) writes both files; this module renders them.

How a leaf link authenticates, as nats-server 2.15 does it (checked against the real
server, ``tests/mesh/test_leaf.py``):

* The hub's ``leafnodes`` block has no ``authorization``: its ``users`` take only
  user/password, not nkeys. Without one, nats-server checks a leaf link against the
  hub's main user list, so the link is the edge's own nkey user, with the edge's
  permissions (``mesh.security.permissions``), revoked with it. Only edges' users allow
  ``LEAFNODE`` connections (``allowed_connection_types``), so a worker's or an
  operator's seed cannot open one.
* The remote signs with the edge's seed (the remote's ``nkey``, a seed inline: nats-server
  reads no seed file there), so the leaf config is as secret as ``creds/NAME.nk``.
* On the link the hub's permissions read from the leaf's side: ``publish`` is what the
  leaf may send to the hub, ``subscribe`` what it may receive. The hub sends them to the
  leaf at connect, which enforces them too; it does not send ``allow_responses``, so
  the edge's answers to workers' liveness probes need an explicit grant
  (``mesh.security``), and a changed permission reaches a leaf when its link reconnects.

JetStream: nats-server always denies ``$JS.API.>`` and ``$KV.>`` on a leaf link of an
ordinary account (only a shared system account may *extend* a domain). So the hub's
JetStream has a domain, ``subjects.HUB_JS_DOMAIN``, where the policy, keys and usage
buckets live; the leaf runs no JetStream and maps the edge's plain ``$JS.API`` and
``$KV`` requests into that domain (``$JS.hub.API.>``), which the hub maps back. The edge
code is the same as on a direct connection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mesh import subjects
from mesh.connection import DEFAULT_NATS_PORT

if TYPE_CHECKING:
    from mesh.tls import HubTls

DEFAULT_LEAF_PORT = 7422  # nats-server's own default leaf node port
LOCAL_HOST = "127.0.0.1"  # the edge's leaf listens on loopback only
_RECONNECT = "1s"  # how soon a leaf retries the hub after a WAN outage
_TLS_TIMEOUT_S = 2

_JS_API = "$JS.API."
_KV = "$KV."


def _hub_domain_api() -> str:
    return f"$JS.{subjects.HUB_JS_DOMAIN}.API."


def in_hub_domain(grants: list[str]) -> list[str]:
    """The hub-domain spelling of the JetStream grants among ``grants``: what the edge's
    leaf turns them into (``$JS.API.X`` -> ``$JS.hub.API.X``, ``$KV.X`` ->
    ``$JS.hub.API.$KV.X``), and so what the hub sees on the leaf link."""
    api = _hub_domain_api()
    out = []
    for grant in grants:
        if grant.startswith(_JS_API):
            out.append(api + grant.removeprefix(_JS_API))
        elif grant.startswith(_KV):
            out.append(api + grant)
    return out


def _js_mappings() -> dict[str, str]:
    """The leaf's subject mappings into the hub's JetStream domain (the hub has the
    reverse ones, installed by nats-server for a domain)."""
    api = _hub_domain_api()
    return {f"{_JS_API}>": f"{api}>", f"{_KV}>": f"{api}{_KV}>"}


def default_hub_url(host: str, port: int, tls_hosts: list[str] | None) -> str:
    """Where edges' leaves reach the hub, by default: its first TLS name, or its host."""
    return f"nats-leaf://{tls_hosts[0] if tls_hosts else host}:{port}"


def render_hub_leafnodes(listen: str, tls: HubTls | None = None) -> str:
    """The hub's ``leafnodes`` block: where edges' leaves connect, over TLS with the
    hub's certificate when the hub has one."""
    lines = [
        "# Edge devices' own nats-servers connect here as leaf nodes (tandem mesh add-edge",
        "# writes their config). No authorization block: nats-server's leafnode users take",
        "# no nkeys, and without one a leaf link is checked against the users above: the",
        "# edge's own user, with its permissions. Only edges' users allow LEAFNODE links.",
        "leafnodes {",
        f"  listen: {json.dumps(listen)}",
    ]
    if tls is not None:
        lines += [
            "  tls {",
            f"    cert_file: {json.dumps(str(tls.cert))}",
            f"    key_file: {json.dumps(str(tls.key))}",
            f"    timeout: {_TLS_TIMEOUT_S}",
            "  }",
        ]
    return "\n".join([*lines, "}", ""])


def render_edge_leaf(
    name: str,
    *,
    public_key: str,
    seed: bytes,
    hub_url: str,
    local_port: int = DEFAULT_NATS_PORT,
    tls_ca: Path | None = None,
) -> str:
    """Edge ``name``'s own nats-server: a leaf node of the hub at ``hub_url``, on loopback
    port ``local_port``, admitting the edge's identity only."""
    local = json.dumps([subjects.local_any()])
    remote = [
        f"      url: {json.dumps(hub_url)}",
        f"      nkey: {json.dumps(seed.decode().strip())}  # the edge's seed: keep it secret",
        f"      deny_imports: {local}  # edge-local subjects stay on the device ...",
        f"      deny_exports: {local}  # ... both ways",
    ]
    if tls_ca is not None:
        remote.append(f"      tls {{ ca_file: {json.dumps(str(tls_ca))} }}  # the hub's CA")
    user = json.dumps({"nkey": public_key})
    return "\n".join(
        [
            f"# Edge {name}'s own nats-server, a leaf node of the hub (tandem mesh add-edge).",
            "# It holds the edge's seed: give it to that edge only. On the device:",
            f"#   nats-server -c {subjects.token(name)}.conf",
            f"#   tandem edge serve --node-id {name} --nats-url "
            f"nats://{LOCAL_HOST}:{local_port} --nats-creds {subjects.token(name)}.nk",
            f"server_name: {json.dumps(f'tandem-leaf-{subjects.token(name)}')}",
            f"listen: {json.dumps(f'{LOCAL_HOST}:{local_port}')}  # loopback only",
            "# Only the edge's identity connects (its processes use its seed file).",
            f"authorization {{ users = [ {user} ] }}",
            "# No JetStream here: the edge's JetStream calls go to the hub's domain.",
            f"mappings = {json.dumps(_js_mappings())}",
            "leafnodes {",
            f"  reconnect: {json.dumps(_RECONNECT)}",
            "  remotes = [",
            "    {",
            *remote,
            "    }",
            "  ]",
            "}",
            "",
        ]
    )


async def kick_leaf_links(
    url: str,
    system_creds: Path,
    *,
    edges: set[str] | None = None,
    tls_ca: Path | None = None,
    timeout_s: float = 2.0,
) -> list[str]:
    """Close the hub's leaf links of ``edges`` (every leaf link when None); returns the
    names of the links closed. A reload re-checks the hub's clients but not its leaf
    links, so a revoked edge's link is kicked: its leaf relinks within a second and is
    refused. A link is known by the leaf's ``server_name``, which the device's config
    sets (``tandem-leaf-<edge>``); a device that changed it is cut off only by kicking
    every link (``edges=None``: the others relink within a second)."""
    from mesh.connection import MeshCredentials, connect

    wanted = None if edges is None else {f"tandem-leaf-{subjects.token(e)}" for e in edges}
    nc = await connect(
        url, name="tandem-mesh-admin", credentials=MeshCredentials(system_creds, tls_ca)
    )
    kicked: list[str] = []
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        # Every server of the hub answers the PING (one per cluster node).
        await nc.publish("$SYS.REQ.SERVER.PING.LEAFZ", b"{}", reply=inbox)
        servers = []
        while True:
            try:
                servers.append(json.loads((await sub.next_msg(timeout=timeout_s / 4)).data))
            except Exception:  # nats-py's TimeoutError: no more answers
                break
        for answer in servers:
            server_id = answer["server"]["id"]
            for link in answer.get("data", {}).get("leafs", []):
                if wanted is not None and link.get("name") not in wanted:
                    continue
                request = json.dumps({"cid": link["id"]}).encode()
                await nc.request(f"$SYS.REQ.SERVER.{server_id}.KICK", request, timeout=timeout_s)
                kicked.append(str(link.get("name")))
    finally:
        await nc.close()
    return kicked
