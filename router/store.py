"""The routing policy's home: one key in a JetStream KV bucket, with history.

Every write is a compare-and-set on the revision the writer read, so of two
concurrent edits exactly one lands and the other gets ``PolicyConflictError`` (with
the revision that beat it); nothing is overwritten unseen. Each stored value is
a small JSON envelope: the policy's YAML exactly as the operator wrote it
(comments kept), who wrote it and why. The store validates before it writes,
but readers validate again: anything can be put into a KV bucket by hand.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict

from mesh import subjects
from mesh.buckets import create_bucket
from router.errors import (
    PolicyBucketNotFoundError,
    PolicyConflictError,
    PolicyError,
    RevisionNotFoundError,
)
from router.policy import RoutingPolicy

__all__ = ["HISTORY", "PolicyStore", "StoredPolicy", "describe", "who"]

HISTORY = 64  # JetStream's maximum per key


@dataclass(frozen=True)
class StoredPolicy:
    """One revision of the stored policy; ``policy`` is None when it does not validate."""

    revision: int
    yaml_text: str
    author: str
    message: str
    written_at: datetime | None
    policy: RoutingPolicy | None
    error: str | None = None


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")
    yaml: str
    author: str = ""
    message: str = ""
    written_at: datetime | None = None  # KV reads by key do not return the message time


def who() -> str:
    """The author recorded with a change: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _decode(entry: KeyValue.Entry) -> StoredPolicy:
    assert entry.revision is not None
    raw = (entry.value or b"").decode("utf-8", errors="replace")
    try:
        envelope = _Envelope.model_validate(json.loads(raw))
    except (ValueError, TypeError) as exc:
        return StoredPolicy(
            entry.revision, raw, "", "", None, None, f"not a policy envelope: {exc}"
        )
    try:
        policy = RoutingPolicy.from_yaml(envelope.yaml)
        error = None
    except PolicyError as exc:
        policy, error = None, str(exc)
    return StoredPolicy(
        entry.revision,
        envelope.yaml,
        envelope.author,
        envelope.message,
        envelope.written_at,
        policy,
        error,
    )


class PolicyStore:
    """Read, write (compare-and-set), list and watch the live routing policy."""

    def __init__(self, nc: Client, kv: KeyValue) -> None:
        self.nc = nc
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client, *, create: bool = True) -> PolicyStore:
        """The store on ``nc``'s JetStream; creates the bucket on first use."""
        js = nc.jetstream()
        try:
            kv = await js.key_value(subjects.POLICY_BUCKET)
        except BucketNotFoundError as exc:
            if not create:
                raise PolicyBucketNotFoundError(
                    f"no policy bucket {subjects.POLICY_BUCKET!r} on this mesh"
                ) from exc
            kv = await create_bucket(
                js,
                api.KeyValueConfig(
                    bucket=subjects.POLICY_BUCKET,
                    history=HISTORY,
                    description="Tandem routing policy (tandem policy ...)",
                ),
            )
        return cls(nc, kv)

    async def current(self) -> StoredPolicy | None:
        """The latest revision, or None if no policy was ever stored (or it was deleted)."""
        try:
            entry = await self._kv.get(subjects.POLICY_KEY)
        except NotFoundError:  # never written, or deleted by hand (KeyDeletedError)
            return None
        return _decode(entry)

    async def at(self, revision: int) -> StoredPolicy:
        """One past revision; ``RevisionNotFoundError`` if the bucket no longer holds it."""
        try:
            entry = await self._kv.get(subjects.POLICY_KEY, revision=revision)
        except KeyNotFoundError as exc:
            raise RevisionNotFoundError(
                f"revision {revision} is not in the policy history"
            ) from exc
        if entry.value is None or entry.operation is not None:
            raise RevisionNotFoundError(f"revision {revision} is a deletion, not a policy")
        return _decode(entry)

    async def history(self) -> list[StoredPolicy]:
        """Every revision still held, oldest first (deletions left out)."""
        try:
            entries = await self._kv.history(subjects.POLICY_KEY)
        except NoKeysError:
            return []
        return [_decode(e) for e in entries if e.operation is None and e.value]

    async def set(
        self, yaml_text: str, *, expect_revision: int, author: str | None = None, message: str = ""
    ) -> int:
        """Validate and store ``yaml_text`` if the stored revision is still ``expect_revision``
        (0: nothing stored yet); returns the new revision. Raises PolicyError on an
        invalid policy, PolicyConflictError when someone else wrote first."""
        RoutingPolicy.from_yaml(yaml_text)  # never store what edges would refuse
        value = _Envelope(
            yaml=yaml_text, author=author or who(), message=message, written_at=datetime.now(UTC)
        )
        data = value.model_dump_json().encode()
        try:
            if expect_revision == 0:
                return await self._kv.create(subjects.POLICY_KEY, data)
            return await self._kv.update(subjects.POLICY_KEY, data, last=expect_revision)
        except KeyWrongLastSequenceError as exc:
            raise PolicyConflictError(expect_revision, await self.current()) from exc

    async def watch(self) -> AsyncIterator[StoredPolicy]:
        """The current policy (if any), then every new revision, as they are written."""
        watcher = await self._kv.watch(subjects.POLICY_KEY)
        try:
            async for entry in watcher:
                if entry is None or entry.value is None or entry.operation is not None:
                    continue  # the "caught up" marker, or a deletion: keep what we have
                yield _decode(entry)
        finally:
            await watcher.stop()


def describe(stored: StoredPolicy) -> dict[str, Any]:
    """A JSON-friendly summary of one revision (for `tandem policy history -o json`)."""
    return {
        "revision": stored.revision,
        "written_at": stored.written_at.isoformat() if stored.written_at else None,
        "author": stored.author,
        "message": stored.message,
        "valid": stored.policy is not None,
        "error": stored.error,
    }
