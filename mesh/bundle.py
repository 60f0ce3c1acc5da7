"""An edge's install bundle: everything a device needs to join the mesh, in one file.

``tandem mesh add-edge NAME`` writes ``DIR/leaf/NAME.bundle.json`` (mode 0600: it
holds the edge's seed) beside the leaf config; the operator copies it to the device,
where ``tandem edge install --bundle FILE`` renders the systemd units, the leaf
node's config and the environment file from it (``tandem.device``). The bundle
names the mesh it belongs to (``mesh_id``), so an install for one hub is never
silently overwritten by a bundle for another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh.errors import MeshError

FORMAT = "tandem-edge-bundle/1"


class BundleError(MeshError):
    """A bundle that is missing, unreadable, or not a Tandem edge bundle."""


class EdgeBundle(BaseModel):
    """The edge's identity, where its leaf reaches the hub, and the hub's CA."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tandem-edge-bundle/1"] = "tandem-edge-bundle/1"
    mesh_id: str = Field(min_length=8, description="the mesh (hub) this edge belongs to")
    node_id: str = Field(min_length=1)
    seed: str = Field(description="the edge's nkey seed (SU...): secret")
    hub_url: str = Field(description="the hub's leaf port, e.g. nats-leaf://hub:7422")
    local_port: int = Field(4222, ge=1, le=65535, description="the leaf's loopback port")
    ca_pem: str | None = Field(None, description="the hub's CA when it runs TLS")

    @field_validator("seed")
    @classmethod
    def _a_user_seed(cls, seed: str) -> str:
        import nkeys

        try:
            nkeys.from_seed(bytearray(seed.encode()))
        except Exception as exc:
            raise ValueError(f"not an nkey seed ({exc})") from exc
        if not seed.startswith("SU"):
            raise ValueError("not a user seed (SU...)")
        return seed

    @field_validator("hub_url")
    @classmethod
    def _a_leaf_url(cls, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("nats-leaf", "tls", "nats") or not rest:
            raise ValueError(f"{url!r} is not a leaf URL (nats-leaf://host:port or tls://...)")
        return url

    @property
    def public_key(self) -> str:
        from mesh.security import public_key

        return public_key(self.seed.encode())


def write_bundle(path: Path, bundle: EdgeBundle) -> None:
    """Write ``bundle`` to a fresh file, mode 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(bundle.model_dump_json(indent=2) + "\n")


def read_bundle(path: Path) -> EdgeBundle:
    """The bundle in ``path``; ``BundleError`` saying what is wrong otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise BundleError(
            f"no bundle at {path}: tandem mesh add-edge NAME writes DIR/leaf/NAME.bundle.json"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read the bundle {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not a Tandem edge bundle (not JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path} is not a Tandem edge bundle (no format {FORMAT!r})")
    try:
        return EdgeBundle.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path} is a damaged edge bundle: {where}: {first['msg']}") from exc
