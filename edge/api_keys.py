"""Per-tenant API keys of the edge API: what a key is, where keys live, who a request is.

A key is a random secret (``tdm-<id>-<secret>``) shown once when it is created; the
edges and the stores hold only its SHA-256, with the tenant it belongs to and its
limits (``ApiKey``). A request's tenant is its key's tenant: the ``x-tandem-tenant``
header counts only from keys created with ``--may-set-tenant`` (gateways that serve
several tenants), never from a client's say-so.

Keys come from one of three places, chosen in the edge's settings:

- ``api_key``: one shared secret (tenant ``default``, may set the tenant), as before;
- ``api_keys_file``: a JSON file (``tandem keys create --file``) for an edge off the
  mesh, re-read within a second of a change;
- ``mesh_api_keys``: the mesh's KV bucket (``tandem keys create``), which every edge
  watches (``ApiKeyFollower``): a new or revoked key reaches every edge within
  milliseconds of the write (plus a resync every few seconds).

A secret's SHA-256 is the index: high-entropy secrets need no slow hash, and a dict
lookup by digest leaks nothing useful through timing (the attacker would have to
choose digests, not secrets). Checking a key costs one SHA-256 and one dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import AuthenticationError
from mesh import subjects
from mesh.buckets import create_bucket

logger = logging.getLogger(__name__)

KEY_PREFIX = "tdm"
_KEY = re.compile(rf"{KEY_PREFIX}-([0-9a-f]{{12}})-[A-Za-z0-9_-]{{32}}")
DEFAULT_TENANT = "default"
_FILE_POLL_S = 1.0
_RESYNC_S = 5.0


class ApiKey(BaseModel):
    """One key as the edges store it: never the secret, only its SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="public id, also inside the secret: tdm-<id>-...")
    tenant: str
    sha256: str = Field(description="hex SHA-256 of the secret")
    rpm: int | None = Field(None, ge=1, description="requests per minute on each edge")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    cloud_tokens_per_hour: int | None = Field(
        None, ge=0, description="the tenant's cloud tokens per hour, over the whole fleet"
    )
    over_budget: Literal["edge", "fail"] = Field(
        "edge", description="over the cloud budget: answer on the edge, or refuse (429)"
    )
    may_set_tenant: bool = Field(False, description="x-tandem-tenant is honoured from it")
    expires_at: datetime | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    created_by: str = ""
    description: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= now


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(tenant: str, **fields: object) -> tuple[str, ApiKey]:
    """A fresh secret (shown once, stored nowhere) and the record the edges keep."""
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(24)}"
    return secret, ApiKey(id=key_id, tenant=tenant, sha256=digest(secret), **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Principal:
    """Who a request is: the tenant it is charged to, and the key it came with."""

    tenant: str
    key: ApiKey | None = None  # None: an open edge, or the one shared key
    may_set_tenant: bool = True

    def tenant_for(self, header: str | None) -> str:
        """The request's tenant: the key's, unless the key may name another."""
        return header if header and self.may_set_tenant else self.tenant


OPEN = Principal(DEFAULT_TENANT)  # an edge without keys: anyone, tenant from the header


class KeyRing:
    """The keys an edge accepts now, indexed by the SHA-256 of their secret."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_digest: dict[str, ApiKey] = {}
        self._ids: dict[str, str] = {}  # id -> digest, for removal by id
        self.replace(keys)

    def __len__(self) -> int:
        return len(self._by_digest)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        by_digest = {k.sha256: k for k in keys}
        self._ids = {k.id: k.sha256 for k in by_digest.values()}
        self._by_digest = by_digest  # one swap: a request sees the old set or the new

    def put(self, key: ApiKey) -> None:
        self.remove(key.id)
        self._by_digest[key.sha256] = key
        self._ids[key.id] = key.sha256

    def remove(self, key_id: str) -> None:
        old = self._ids.pop(key_id, None)
        if old is not None:
            self._by_digest.pop(old, None)

    def check(self, secret: str, now: float) -> ApiKey:
        """The key of ``secret``, or ``AuthenticationError`` saying what is wrong."""
        match = _KEY.fullmatch(secret)
        if match is None:
            raise AuthenticationError(
                f"malformed API key; Tandem keys look like '{KEY_PREFIX}-<12 hex>-<32 chars>' "
                "(tandem keys create)"
            )
        key = self._by_digest.get(digest(secret))
        if key is None:
            raise AuthenticationError(
                f"invalid or revoked API key {KEY_PREFIX}-{match.group(1)}-..."
            )
        if key.expired(now):
            assert key.expires_at is not None
            raise AuthenticationError(
                f"API key {KEY_PREFIX}-{key.id}-... expired at {key.expires_at.isoformat()}"
            )
        return key


def bearer(header: str | None) -> str:
    """The secret of an ``Authorization: Bearer <secret>`` header."""
    if not header:
        raise AuthenticationError("missing API key; send 'Authorization: Bearer <key>'")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError(
            "malformed Authorization header; send 'Authorization: Bearer <key>'"
        )
    return secret.strip()


class Authenticator:
    """Who a request is, from its Authorization header, by the edge's key settings."""

    def __init__(
        self, shared: str | None = None, ring: KeyRing | None = None, source: str = "none"
    ) -> None:
        self._shared = shared.encode() if shared is not None else None
        self.ring = ring  # None: no per-tenant keys
        self.source = source  # where the ring's keys come from: file, mesh

    def status(self) -> dict[str, object]:
        """For /health: whether keys are required, from where, and how many are known."""
        return {
            "required": self.enabled,
            "shared_key": self._shared is not None,
            "source": self.source if self.ring is not None else None,
            "keys": len(self.ring) if self.ring is not None else None,
        }

    @property
    def enabled(self) -> bool:
        return self._shared is not None or self.ring is not None

    def principal(self, header: str | None, now: float | None = None) -> Principal:
        if not self.enabled:
            return OPEN
        secret = bearer(header)
        if self._shared is not None and hmac.compare_digest(secret.encode(), self._shared):
            return OPEN
        if self.ring is None:
            raise AuthenticationError("invalid API key")
        key = self.ring.check(secret, time.time() if now is None else now)
        return Principal(key.tenant, key, key.may_set_tenant)


# -- a file of keys, for an edge off the mesh ------------------------------------------------


class _Follower:
    """A background task that keeps a ring current (``_follow``), started and stopped
    with the daemon."""

    _name = "api-keys"
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=self._name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        raise NotImplementedError


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[ApiKey] = Field(default_factory=list)


def read_key_file(path: Path) -> list[ApiKey]:
    """The keys in ``path`` (none if it does not exist); ValueError if it is not a key file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        return _KeyFile.model_validate_json(text).keys
    except ValidationError as exc:
        raise ValueError(f"{path} is not a Tandem API key file: {exc}") from exc


def write_key_file(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace ``path`` atomically (a reading edge sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_KeyFile(keys=list(keys)).model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


class KeyFileFollower(_Follower):
    """Keeps a ring on a key file: re-read within a second of a change. A file that
    stops parsing keeps the last good keys (and says so in the log)."""

    def __init__(self, path: Path, ring: KeyRing, poll_s: float = _FILE_POLL_S) -> None:
        self._path, self._ring, self._poll_s = path, ring, poll_s
        self._seen: tuple[int, int] | None = None
        self._name = "api-key-file"
        self.load()  # at startup a bad file is fatal: the daemon exits saying why

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def load(self) -> None:
        stamp = self._stamp()
        self._ring.replace(read_key_file(self._path))
        self._seen = stamp
        logger.info("API keys: %d from %s", len(self._ring), self._path)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            if self._stamp() == self._seen:
                continue
            try:
                self.load()
            except (OSError, ValueError) as exc:
                self._seen = self._stamp()
                logger.error("API key file unusable, keeping the last good keys: %s", exc)


# -- the mesh's key bucket ------------------------------------------------------------------


class KeyStore:
    """The mesh's API keys in NATS KV: one entry per key id (hashes, never secrets)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client, *, create: bool = False) -> KeyStore:
        """The bucket; ``create`` (operators) makes it, and the usage bucket, on first use."""
        js = nc.jetstream()
        try:
            kv = await js.key_value(subjects.API_KEYS_BUCKET)
        except BucketNotFoundError:
            if not create:
                raise
            kv = await create_bucket(
                js,
                api.KeyValueConfig(
                    bucket=subjects.API_KEYS_BUCKET,
                    history=1,
                    description="Tandem edge API keys (tandem keys ...): SHA-256 only",
                ),
            )
            from edge.fleet_usage import FleetUsage

            await FleetUsage.create_bucket(nc)
        return cls(kv)

    async def put(self, key: ApiKey) -> None:
        await self._kv.put(key.id, key.model_dump_json().encode())

    async def revoke(self, key_id: str) -> ApiKey:
        """Delete a key (edges drop it as the deletion reaches their watch)."""
        try:
            entry = await self._kv.get(key_id)
        except NotFoundError as exc:
            raise KeyError(key_id) from exc
        await self._kv.delete(key_id)
        return ApiKey.model_validate_json(entry.value or b"")

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        watcher = await self._kv.watchall()
        try:
            return sorted((await _snapshot(watcher)).values(), key=lambda k: k.created_at)
        finally:
            await watcher.stop()

    async def watch(self) -> KeyValue.KeyWatcher:
        """A watch of every key: the current ones (``_snapshot``), then each change."""
        return await self._kv.watchall()


async def _snapshot(watcher: KeyValue.KeyWatcher) -> dict[str, ApiKey]:
    """The keys a fresh watch delivers before its "caught up" marker."""
    keys: dict[str, ApiKey] = {}
    async for entry in watcher:
        if entry is None:
            break
        key = None if entry.operation in ("DEL", "PURGE") else _decode(entry.value)
        if key is None:
            keys.pop(entry.key, None)
        else:
            keys[entry.key] = key
    return keys


def _decode(value: bytes | None) -> ApiKey | None:
    if not value:
        return None
    try:
        return ApiKey.model_validate_json(value)
    except ValidationError as exc:
        logger.error("ignoring an API key entry that does not parse: %s", exc)
        return None


class ApiKeyFollower(_Follower):
    """Keeps a ring on the mesh's key bucket: a watch for new and revoked keys within
    milliseconds, and a full re-read every ``resync_s`` (and after a reconnect) in case
    the watch missed something while NATS was away."""

    def __init__(self, nc: Client, ring: KeyRing, resync_s: float = _RESYNC_S) -> None:
        self._nc, self._ring, self._resync_s = nc, ring, resync_s
        self._name = "api-key-watch"
        self.synced = asyncio.Event()  # set once the first full read landed

    async def _follow(self) -> None:
        while True:
            try:
                store = await KeyStore.open(self._nc)
                while True:  # a fresh watch every resync_s: its snapshot is the full set
                    await self._follow_one_watch(store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no bucket yet, or NATS away: every request is a 401
                logger.debug("API key watch interrupted (%s); retrying", exc)
            await asyncio.sleep(1.0)

    async def _follow_one_watch(self, store: KeyStore) -> None:
        reconnects = self._nc.stats["reconnects"]
        watcher = await store.watch()
        try:
            self._ring.replace((await _snapshot(watcher)).values())
            self.synced.set()
            until = time.monotonic() + self._resync_s
            while (left := until - time.monotonic()) > 0:
                if self._nc.stats["reconnects"] != reconnects:
                    return  # a watch does not reliably survive a reconnect: re-create it
                try:
                    entry = await watcher.updates(timeout=min(left, 1.0))
                except TimeoutError:
                    continue
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE"):
                    self._ring.remove(entry.key)
                    logger.info("API key %s revoked", entry.key)
                elif (key := _decode(entry.value)) is not None:
                    self._ring.put(key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()


def describe(key: ApiKey) -> dict[str, object]:
    """A JSON-friendly view of a key (for tandem keys list -o json): no digest."""
    data = json.loads(key.model_dump_json(exclude={"sha256"}))
    data["key"] = f"{KEY_PREFIX}-{key.id}-..."
    return data
