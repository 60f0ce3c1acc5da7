"""Who may do what on the mesh: roles, their NATS permissions, and the hub's user list.

Every node has an identity of its own, a NATS *nkey user* (an ed25519 key pair: the
hub holds only the public key, the node its seed file). This module is the one place
that says what each role may publish and subscribe to; the hub's configuration is
rendered from it, and every permission names the call that needs it.

Why static nkey users and not decentralized JWT accounts: a mesh is one account (every
node talks to every other), so accounts would add an operator key, an account key, a
resolver and JWT revocation lists to express nothing more. Static users with
permissions, in a file the hub includes, give the same least privilege; adding or
revoking a node rewrites that file and tells the hub to reload it (``SIGHUP``): no
restart of the hub or of other nodes, and nats-server closes the connection of a
user that is no longer in the file at the reload.

Layout of a mesh directory (``tandem mesh init DIR``)::

    DIR/server.conf     a standalone hub's nats-server config: ports, JetStream, auth.conf
    DIR/auth.conf       authorization (includes users.conf) and the pid file: an embedded
                        hub (``tandem up``, tests) runs with this one alone
    DIR/users.conf      rendered from nodes.json: one user per node, with permissions
    DIR/nodes.json      the registry: name, role, public key of every node (and an
                        edge's models: the only cloud subjects it may ask)
    DIR/creds/NAME.nk   each node's seed (give it to that node only; mode 0600)
    DIR/leaf/NAME.conf  edge NAME's own nats-server, a leaf node of the hub (``mesh.leaf``;
                        it holds the edge's seed too: mode 0600)
    DIR/leaf/hub-url    where edges' leaves reach the hub unless told (tandem mesh init)
    DIR/leaf/NAME.bundle.json  edge NAME's install bundle (``mesh.bundle``): seed, hub URL,
                        CA, for ``tandem edge install --bundle`` on the device (0600)
    DIR/mesh-id         this mesh's id, named in its bundles
    DIR/system.conf     the hub's system account (its user's seed: DIR/system.nk), with
                        which tandem mesh closes a revoked edge's leaf link
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mesh import leaf, subjects
from mesh.connection import DEFAULT_NATS_PORT
from mesh.errors import MeshError
from models.catalog import DEFAULT_PAIR

Role = Literal["edge", "worker", "operator", "planner"]
ROLES: tuple[Role, ...] = ("edge", "worker", "operator", "planner")

_QUEUE = "q"  # nats.micro's default queue group: the workers' endpoints join it


class MeshConfigError(MeshError):
    """A mesh directory or node name that cannot be used as asked."""


def inbox_prefix(name: str) -> str:
    """A node's private inbox prefix: replies (requests, JetStream acks, KV watch
    deliveries; nats-py's ``inbox_prefix`` covers them all) come only under it."""
    return f"_INBOX.{subjects.token(name)}"


# -- the permissions, role by role ----------------------------------------------------------


def _kv_read(bucket: str) -> tuple[str, ...]:
    """Reading and watching a JetStream KV bucket (nats-py's KeyValue; a bucket is the
    stream KV_<bucket>): the policy (router.store), API keys and usage (edge.api_keys)."""
    stream = f"KV_{bucket}"
    return (
        f"$JS.API.STREAM.INFO.{stream}",  # js.key_value(): the bucket exists?
        f"$JS.API.DIRECT.GET.{stream}",  # kv.get() (direct get of the last message)
        f"$JS.API.DIRECT.GET.{stream}.>",  # kv.get() by subject
        f"$JS.API.STREAM.MSG.GET.{stream}",  # kv.get(revision=...)
        f"$JS.API.CONSUMER.CREATE.{stream}",  # kv.watch() / history(): ordered consumer
        f"$JS.API.CONSUMER.CREATE.{stream}.>",  # ... the same, with a filter subject
        f"$JS.API.CONSUMER.INFO.{stream}.*",  # ordered consumer's reset checks
        f"$JS.API.CONSUMER.DELETE.{stream}.*",  # watcher.stop()
        f"$JS.FC.{stream}.>",  # flow control replies: without them a watch stalls silently
    )


def _kv_put(bucket: str) -> tuple[str, ...]:
    """Writing keys of an existing bucket: kv.put / create / update (CAS) / delete."""
    return (f"$KV.{bucket}.>",)


def _kv_create(bucket: str) -> tuple[str, ...]:
    """Creating a bucket on first use (operators only: edges open with create=False)."""
    stream = f"KV_{bucket}"
    return (
        f"$JS.API.STREAM.CREATE.{stream}",  # js.create_key_value()
        f"$JS.API.STREAM.UPDATE.{stream}",  # ... when the bucket exists with other limits
    )


_POLICY = subjects.POLICY_BUCKET
_KEYS = subjects.API_KEYS_BUCKET
_USAGE = subjects.USAGE_BUCKET
_PLANNER = subjects.PLANNER_BUCKET


def _edge_models(name: str, models: Iterable[str]) -> list[str]:
    """An edge's cloud requests, for each of its models only: the generate and verify
    queue groups and its own cancels."""
    out: list[str] = []
    for model in models:
        out += [
            subjects.cloud_generate(model),  # CloudRoute._submit: the model's queue group
            subjects.cloud_verify(model),  # CloudRoute.verify
            # CancelRequest when the client goes away (CloudRoute.generate), under its own
            # name only: workers honour a cancel from the node the stream goes to.
            subjects.cloud_cancel(model, name),
        ]
    if not out:
        raise MeshConfigError(f"edge {name!r} needs a model: the cloud subjects it may ask")
    return out


def permissions(
    role: Role,
    name: str,
    *,
    workers: Iterable[str] = (),
    models: Iterable[str] = (DEFAULT_PAIR,),
) -> dict[str, Any]:
    """The NATS permissions of node ``name`` in ``role`` (nats-server's config shape);
    ``workers``: the mesh's workers, whose liveness probes an edge answers; ``models``:
    an edge's catalog pairs, the only models whose cloud subjects it may ask."""
    own_inbox = f"{inbox_prefix(name)}.>"
    if role == "edge":
        publish = [
            *_edge_models(name, models),
            # A session's own worker (affinity): its subjects name the worker, not its
            # model, and the registry does not know workers' models, so these are not
            # scoped to the edge's models (CloudRoute picks workers of its model only).
            subjects.worker_any("generate"),
            subjects.worker_any("verify"),
            subjects.node_load(name),  # Heartbeater: its own heartbeats only
            subjects.policy_applied(),  # PolicyFollower's reports
            *_kv_read(_POLICY),  # PolicyFollower: watch and resync; never a write
            *_kv_read(_KEYS),  # ApiKeyFollower: the tenants' keys (hashes); never a write
            *_kv_read(_USAGE),  # FleetBudget: the tenants' fleet-wide cloud tokens ...
            *_kv_put(_USAGE),  # ... which it adds its own to (compare-and-set)
            # Behind a leaf node, answers to the workers' liveness probes: nats-server
            # carries no allow_responses over a leaf link, so each worker's inbox is
            # granted (all an edge can put there is "still here"; nothing else uses it).
            *(f"{inbox_prefix(worker)}.>" for worker in workers),
        ]
        # Behind a leaf node the JetStream calls above arrive in the hub's domain
        # ($JS.hub.API...): the edge's leaf maps them there (mesh.leaf).
        publish += leaf.in_hub_domain(publish)
        subscribe = [own_inbox, subjects.all_node_loads()]  # FleetView reads heartbeats
        # The edge answers a worker's liveness probe on <its reply subject>.alive.
        return _shape(publish, subscribe, responses=True)
    if role == "worker":
        publish = [
            subjects.node_load(name),  # Heartbeater
            "_INBOX.*.>",  # token streams to requesters' reply subjects, liveness probes
            # A decode worker asks the prefill pool (cloud.disaggregation.PrefillClient):
            # the queue group, or a session's own prefill worker. Only workers may: an
            # edge's request never reaches a prefill worker directly.
            subjects.cloud_any("prefill"),
            subjects.worker_any("prefill"),
            # A decode worker follows the routing policy's disaggregation section
            # (router.live.PolicyFollower): read and watch, never a write, and its report.
            *_kv_read(_POLICY),
            subjects.policy_applied(),
        ]
        subscribe = [
            f"{subjects.cloud_any('generate')} {_QUEUE}",  # nats.micro endpoints, group q
            f"{subjects.cloud_any('verify')} {_QUEUE}",
            f"{subjects.cloud_any('prefill')} {_QUEUE}",  # a prefill worker's endpoint
            subjects.worker_all(name),  # its affinity endpoints
            subjects.cloud_cancels(),  # cancels are broadcast to every worker, from any node
            "$SRV.>",  # nats.micro discovery: PING, INFO, STATS
            own_inbox,  # replies to its liveness probes
        ]
        # One reply per request (GenerateAccepted, a verdict, a $SRV answer, an error);
        # token streams go to the reply subject in the request body, allowed above.
        return _shape(publish, subscribe, responses=True)
    if role == "operator":
        publish = [
            *_kv_read(_POLICY),  # tandem policy show / history / diff / explain
            *_kv_create(_POLICY),  # tandem policy set / rollback / edit
            *_kv_put(_POLICY),
            *_kv_read(_KEYS),  # tandem keys list
            *_kv_create(_KEYS),  # tandem keys create / revoke
            *_kv_put(_KEYS),
            *_kv_read(_USAGE),  # tandem keys list: fleet-wide cloud tokens this hour
            *_kv_create(_USAGE),  # tandem keys create makes the bucket edges count in
            "$SRV.>",  # nats.micro discovery of the workers' services: PING, INFO, STATS
            *_kv_read(_PLANNER),  # tandem planner config show
            *_kv_create(_PLANNER),  # tandem planner config set (PlannerStore.open)
            *_kv_put(_PLANNER),
        ]
        subscribe = [
            own_inbox,
            subjects.all_planner_decisions(),  # tandem status: the planners' targets
            subjects.all_node_loads(),  # tandem status
            subjects.policy_applied(),  # tandem policy set --wait: which edges applied it
        ]
        return _shape(publish, subscribe, responses=False)
    if role == "planner":
        publish = [
            # PlannerStore: the configuration (watch_config, config) and the lease
            # (acquire/renew/release_lease: create and compare-and-set updates) ...
            *_kv_read(_PLANNER),
            *_kv_put(_PLANNER),
            *_kv_create(_PLANNER),  # ... in a bucket it creates if no operator did yet
            *_kv_read(_POLICY),  # Planner._follow_policy: the routing policy's slo; no write
            # Planner._publish: its decisions, for any pool (a pool is named at run time).
            subjects.all_planner_decisions(),
        ]
        subscribe = [own_inbox, subjects.all_node_loads()]  # Planner.fleet: the heartbeats
        return _shape(publish, subscribe, responses=False)
    raise MeshConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


_DENY_ALL = {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}


def connection_types(role: Role) -> list[str]:
    """How a node in ``role`` may connect: edges directly or as a leaf node, the others
    directly only (so only an edge's seed opens a leaf link)."""
    return ["STANDARD", "LEAFNODE"] if role == "edge" else ["STANDARD"]


def _shape(publish: list[str], subscribe: list[str], *, responses: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if responses:
        out["allow_responses"] = {"max": 1, "expires": "5m"}
    return out


# -- nkeys ------------------------------------------------------------------------------------


def new_user_seed() -> bytes:
    """A fresh nkey user seed (``SU...``)."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key (``U...``) of a user seed."""
    import nkeys

    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


# -- the mesh directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One identity on the mesh."""

    name: str
    role: Role
    public_key: str
    # An edge's catalog pairs: the only models whose cloud subjects it may ask.
    models: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        """A registry entry; an edge registered before edges had models gets the
        catalog's default pair."""
        models = tuple(data.get("models") or ())
        if data["role"] == "edge" and not models:
            models = (DEFAULT_PAIR,)
        return cls(data["name"], data["role"], data["public_key"], models)

    def to_json(self) -> dict[str, Any]:
        """The registry entry (models for an edge only)."""
        entry = {"name": self.name, "role": self.role, "public_key": self.public_key}
        return entry | ({"models": list(self.models)} if self.role == "edge" else {})


class MeshDir:
    """A hub's configuration directory: its nodes, their credentials, the rendered files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def server_conf(self) -> Path:
        return self.root / "server.conf"

    @property
    def auth_conf(self) -> Path:
        return self.root / "auth.conf"

    @property
    def users_conf(self) -> Path:
        return self.root / "users.conf"

    @property
    def registry(self) -> Path:
        return self.root / "nodes.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "nats-server.pid"

    def creds(self, name: str) -> Path:
        """Where node ``name``'s seed file is."""
        return self.root / "creds" / f"{subjects.token(name)}.nk"

    def leaf_conf(self, name: str) -> Path:
        """Where edge ``name``'s leaf-node config is (``nats-server -c`` on the device)."""
        return self.root / "leaf" / f"{subjects.token(name)}.conf"

    @property
    def hub_leaf_url(self) -> Path:
        """The file naming where edges' leaves reach the hub by default."""
        return self.root / "leaf" / "hub-url"

    @property
    def tls_ca(self) -> Path:
        """The CA nodes trust the hub with (``--nats-tls-ca``), when the hub runs TLS."""
        return self.root / "tls" / "ca.pem"

    def init(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        monitor_port: int = 8222,
        tls_hosts: list[str] | None = None,
        leaf_port: int = leaf.DEFAULT_LEAF_PORT,
        tls_files: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """Write a new hub configuration (refused if one is there already).

        ``tls_hosts``: the names and addresses nodes reach the hub by; the hub then
        requires TLS, with a certificate for them from a new dev CA (``mesh.tls``), on
        its client and leaf node ports alike. ``tls_files``: the operator's own (CA,
        certificate, key) instead of a dev CA (``tls_hosts`` then only names the hub for
        the edges' leaf URL). ``leaf_port``: where edges' own nats-servers connect as
        leaf nodes (``mesh.leaf``)."""
        if self.registry.exists():
            raise MeshConfigError(f"{self.root} holds a mesh already ({self.registry})")
        (self.root / "creds").mkdir(parents=True, exist_ok=True)
        (self.root / "jetstream").mkdir(exist_ok=True)
        (self.root / "leaf").mkdir(exist_ok=True)
        tls, files = "", None
        if tls_files is not None:
            from mesh.tls import install_operator_tls

            try:
                files = install_operator_tls(self.tls_ca.parent, *tls_files)
            except ValueError as exc:
                raise MeshConfigError(str(exc)) from exc
        elif tls_hosts:
            from mesh.tls import write_dev_ca

            files = write_dev_ca(self.tls_ca.parent, tls_hosts)
        if files is not None:
            tls = (
                f"tls {{\n  cert_file: {json.dumps(str(files.cert))}\n"
                f"  key_file: {json.dumps(str(files.key))}\n  timeout: 2\n}}\n"
            )
        system_seed = new_user_seed()
        fd = os.open(self.system_creds, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(system_seed + b"\n")
        system_user = json.dumps({"nkey": public_key(system_seed)})
        self.system_conf.write_text(
            "# The hub's own administration (tandem mesh revoke closes a revoked edge's\n"
            "# leaf link, which a reload does not): DIR/system.nk, held by tandem mesh only.\n"
            f"accounts {{ SYS {{ users = [ {system_user} ] }} }}\n"
            "system_account: SYS\n"
        )
        self.auth_conf.write_text(
            "# Who may connect, and do what (tandem mesh). Embedded hubs (tandem up) run\n"
            "# with this file alone; server.conf adds ports and storage for a standalone hub.\n"
            f"pid_file: {json.dumps(str(self.pid_file))}\n"
            f"{tls}"
            "authorization {\n  include users.conf\n}\n"
            "include system.conf\n"
        )
        self.server_conf.write_text(
            "# Tandem hub (tandem mesh init): nats-server -c server.conf\n"
            f"listen: {json.dumps(f'{host}:{port}')}\n"
            f"http: {json.dumps(f'{host}:{monitor_port}')}\n"
            # The policy, keys and usage buckets live in this domain (mesh.leaf).
            f"jetstream {{\n  store_dir: {json.dumps(str(self.root / 'jetstream'))}\n"
            f"  domain: {json.dumps(subjects.HUB_JS_DOMAIN)}\n}}\n"
            "include auth.conf\n"
            f"{leaf.render_hub_leafnodes(f'{host}:{leaf_port}', files)}"
        )
        self.hub_leaf_url.write_text(leaf.default_hub_url(host, leaf_port, tls_hosts) + "\n")
        self._save([])

    def nodes(self) -> list[Node]:
        """Every node the hub admits."""
        if not self.registry.exists():
            raise MeshConfigError(f"no mesh at {self.root}: run tandem mesh init {self.root}")
        return [Node.from_json(n) for n in json.loads(self.registry.read_text())]

    def add(
        self,
        name: str,
        role: Role,
        *,
        hub_url: str | None = None,
        local_port: int = DEFAULT_NATS_PORT,
        models: Iterable[str] | None = None,
    ) -> Path:
        """Admit a new node; returns its seed file (written once, mode 0600).

        An edge may ask the cloud for its ``models`` only (catalog pair names; default:
        the catalog's default pair). It also gets its leaf-node config (``leaf_conf``): a
        nats-server on the device's loopback ``local_port``, a leaf of the hub at
        ``hub_url`` (default: the one ``init`` recorded)."""
        edge_models = _models_of(role, models)
        # An unknown role, or an edge with no model, fails before anything is written.
        permissions(role, name, models=edge_models)
        nodes = self.nodes()
        if any(n.name == name for n in nodes):
            raise MeshConfigError(f"a node named {name!r} exists; revoke it first")
        seed = new_user_seed()
        path = self.creds(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(seed + b"\n")
        if role == "edge":
            self._write_leaf_conf(name, seed, hub_url=hub_url, local_port=local_port)
        self._save([*nodes, Node(name, role, public_key(seed), edge_models)])
        return path

    def _write_leaf_conf(
        self, name: str, seed: bytes, *, hub_url: str | None, local_port: int
    ) -> None:
        """Edge ``name``'s leaf config (for a hand-run leaf) and its install bundle."""
        from mesh.bundle import EdgeBundle, write_bundle

        if hub_url is None and self.hub_leaf_url.exists():
            hub_url = self.hub_leaf_url.read_text().strip()
        hub_url = hub_url or leaf.default_hub_url("127.0.0.1", leaf.DEFAULT_LEAF_PORT, None)
        tls_ca = self.tls_ca if self.tls_ca.exists() else None
        text = leaf.render_edge_leaf(
            name,
            public_key=public_key(seed),
            seed=seed,
            hub_url=hub_url,
            local_port=local_port,
            tls_ca=tls_ca,
        )
        path = self.leaf_conf(name)
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)  # a fresh file, so mode 0600 holds from its first byte
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        bundle = EdgeBundle(
            mesh_id=self.mesh_id,
            node_id=name,
            seed=seed.decode().strip(),
            hub_url=hub_url,
            local_port=local_port,
            ca_pem=tls_ca.read_text() if tls_ca else None,
        )
        write_bundle(self.bundle(name), bundle)

    def bundle(self, name: str) -> Path:
        """Edge ``name``'s install bundle (``tandem edge install --bundle``; 0600)."""
        return self.root / "leaf" / f"{subjects.token(name)}.bundle.json"

    def client_url(self) -> str:
        """The hub's client URL as ``server.conf`` sets it (``tls://`` when it runs TLS)."""
        listen = "127.0.0.1:4222"
        for line in self.server_conf.read_text().splitlines():
            if line.startswith("listen:"):
                listen = json.loads(line.partition(":")[2].strip())
        return f"{'tls' if self.tls_ca.exists() else 'nats'}://{listen}"

    @property
    def system_conf(self) -> Path:
        """The hub's system account (``include``d by ``auth.conf``; a cluster mounts it)."""
        return self.root / "system.conf"

    @property
    def system_creds(self) -> Path:
        """The hub's system-account identity (``mesh.leaf.kick_leaf_links``); not a node."""
        return self.root / "system.nk"

    @property
    def mesh_id(self) -> str:
        """This mesh's id, named in its edges' bundles (made on first use)."""
        path = self.root / "mesh-id"
        if not path.exists():
            path.write_text(os.urandom(8).hex() + "\n")
        return path.read_text().strip()

    def ensure(self, name: str, role: Role, *, models: Iterable[str] | None = None) -> Path:
        """Node ``name``'s seed file, admitting it first if it is new (``tandem up``); an
        edge that is known keeps its key and is given ``models`` when they are named."""
        nodes = self.nodes()
        known = {n.name: n for n in nodes}
        if name in known and known[name].role == role and self.creds(name).exists():
            if role == "edge" and models is not None:
                wanted = _models_of(role, models)
                permissions(role, name, models=wanted)  # no model: refused, nothing changed
                self._save([replace(n, models=wanted) if n.name == name else n for n in nodes])
            return self.creds(name)
        if name in known:
            self.revoke(name)
        return self.add(name, role, models=models)

    def revoke(self, name: str) -> Node:
        """Remove a node: the hub refuses it from the next reload on."""
        nodes = self.nodes()
        gone = [n for n in nodes if n.name == name]
        if not gone:
            raise MeshConfigError(f"no node named {name!r} in {self.root}")
        self._save([n for n in nodes if n.name != name])
        self.creds(name).unlink(missing_ok=True)
        self.leaf_conf(name).unlink(missing_ok=True)
        self.bundle(name).unlink(missing_ok=True)
        return gone[0]

    def reload_hub(self) -> bool:
        """Tell a running hub to re-read its users (SIGHUP); False if none is running."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return True

    def rerender(self) -> None:
        """Render ``users.conf`` again from ``nodes.json``: after an upgrade, the nodes get
        the permissions this version's code needs (``tandem up`` does it at each start)."""
        self._save(self.nodes())

    def _save(self, nodes: Iterable[Node]) -> None:
        nodes = list(nodes)
        self.registry.write_text(json.dumps([n.to_json() for n in nodes], indent=2) + "\n")
        self.users_conf.write_text(render_users(nodes))


def _models_of(role: Role, models: Iterable[str] | None) -> tuple[str, ...]:
    """The models a new node in ``role`` is registered with: an edge's (default: the
    catalog's default pair, in order, once each); none for the other roles."""
    if role != "edge":
        if models:
            raise MeshConfigError(f"only edges are given models, not a {role}")
        return ()
    if models is None:
        return (DEFAULT_PAIR,)
    named = tuple(dict.fromkeys(models))
    if not all(named):
        raise MeshConfigError("a model name cannot be empty")
    return named


def render_users(nodes: Iterable[Node]) -> str:
    """The ``users`` list of the hub's ``authorization`` block, one nkey user per node.

    It always starts with a user nobody can be (its seed is thrown away) and who may do
    nothing: with an empty list nats-server would admit anonymous clients."""
    nodes = list(nodes)
    workers = [n.name for n in nodes if n.role == "worker"]
    sentinel = {"nkey": public_key(new_user_seed()), "permissions": _DENY_ALL}
    entries = [f"  # nobody (keeps authorization on with no nodes)\n  {json.dumps(sentinel)}"]
    for node in nodes:
        entry = {
            "nkey": node.public_key,
            "permissions": permissions(
                node.role, node.name, workers=workers, models=node.models or (DEFAULT_PAIR,)
            ),
            "allowed_connection_types": connection_types(node.role),
        }
        entries.append(f"  # {node.role} {node.name}\n  {json.dumps(entry)}")
    body = ",\n".join(entries)
    header = "# Rendered by tandem mesh from nodes.json: change it with tandem mesh add-*/revoke."
    return f"{header}\nusers = [\n{body}\n]\n"
