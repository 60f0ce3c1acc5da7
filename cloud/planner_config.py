"""The planner's configuration and lease, both in the JetStream KV bucket ``tandem_planner``.

The configuration of pool P is the key ``config.P``: YAML as the operator wrote it, in
the same envelope, with the same compare-and-set writes and the same live following as
the routing policy (``router.store``): a revision that does not validate is never
applied, and the planner keeps the last good one. Bounds and the SLO live here.

The lease of pool P is the key ``lease.P``: the holder's id and when it expires. A
planner takes it with a create (only one can create a key), renews it with an update
on the revision it holds (compare-and-set: a planner that lost the lease cannot renew
it), and may take over an expired lease with an update on the expired revision. A
second planner for the pool is refused while the first one renews.

    store = await PlannerStore.open(nc)
    rev = await store.set_config("pool", yaml_text, expect_revision=0)
    lease = await store.acquire_lease("pool", "planner-1", ttl_s=15)
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Self

import yaml
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud.planner_forecast import ForecasterKind
from mesh import subjects
from models.catalog import DEFAULT_PAIR
from router.policy import load_yaml
from router.store import HISTORY, who

__all__ = [
    "ConnectorError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "PlannerConfig",
    "PlannerConfigConflictError",
    "PlannerConfigError",
    "PlannerError",
    "PlannerStore",
    "StoredPlannerConfig",
]


class PlannerError(Exception):
    """Base of the planner's errors.

    PlannerError
    ├── PlannerConfigError          a configuration does not validate (names the field)
    ├── PlannerConfigConflictError  a configuration write lost its compare-and-set
    ├── LeaseHeldError              another planner holds the pool (fatal at start)
    ├── LeaseLostError              this planner's lease was taken (stop acting)
    └── ConnectorError              a scale action failed (recoverable: retried)
    """


class ConnectorError(PlannerError):
    """A connector could not start, stop or read workers (retried with backoff)."""


class PlannerConfigError(PlannerError):
    """A planner configuration does not validate (the message names the field)."""


class PlannerConfigConflictError(PlannerError):
    """Someone else wrote the planner configuration since the revision read."""


class LeaseHeldError(PlannerError):
    """Another planner holds this pool's lease."""


class LeaseLostError(PlannerError):
    """This planner's lease was taken or expired: it must stop acting."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_TTFT_P95_MS = 2000.0
DEFAULT_ITL_P95_MS = 250.0


class Slo(_Strict):
    """The targets the fleet is sized for. A field left out follows the routing policy's
    ``slo`` (``tandem policy``: one SLO for the router and the planner), and the built-in
    default where the policy sets none; a field set here overrides both for this pool."""

    ttft_p95_ms: Annotated[float, Field(gt=0)] | None = None
    itl_p95_ms: Annotated[float, Field(gt=0)] | None = None

    def resolve(
        self, policy_ttft_ms: float | None, policy_itl_ms: float | None
    ) -> tuple[float, float]:
        """(TTFT, ITL) targets in ms: this config's, else the policy's, else the defaults."""
        ttft = self.ttft_p95_ms or policy_ttft_ms or DEFAULT_TTFT_P95_MS
        itl = self.itl_p95_ms or policy_itl_ms or DEFAULT_ITL_P95_MS
        return ttft, itl


class Bounds(_Strict):
    """How far the planner may size the pool."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 8
    scale_to_zero: bool = False  # min_replicas 0 needs this too: no zero by a typo

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.min_replicas == 0 and not self.scale_to_zero:
            raise ValueError("min_replicas 0 needs scale_to_zero: true")
        return self


class Workload(_Strict):
    """Request shape assumed until the heartbeats measure it (tokens per request)."""

    prompt_tokens: Annotated[float, Field(gt=0)] = 600.0
    output_tokens: Annotated[float, Field(gt=0)] = 40.0
    cached_share: Annotated[float, Field(ge=0, lt=1)] = 0.5  # of the prompt, in prefix cache
    # The measured shape weighs recent requests: a request's weight halves every this
    # many seconds (``ShapeMeter``), so capacity follows a change of workload within
    # minutes and does not jump when workers join or leave.
    measured_half_life_s: Annotated[float, Field(gt=0)] = 60.0


class Reactive(_Strict):
    """The fast guard: scale up at once when the queue says the forecast was short."""

    waiting_per_replica: Annotated[float, Field(gt=0)] = 4.0


class PlannerConfig(_Strict):
    """One pool's planner configuration, edited live (``tandem planner config set``)."""

    model: str = DEFAULT_PAIR
    slo: Slo = Field(default_factory=Slo)
    bounds: Bounds = Field(default_factory=Bounds)
    workload: Workload = Field(default_factory=Workload)
    reactive: Reactive = Field(default_factory=Reactive)
    forecaster: ForecasterKind = "holt_winters"
    season_periods: Annotated[int, Field(ge=0)] = 0  # Holt-Winters season, in samples
    sample_s: Annotated[float, Field(gt=0)] = 5.0  # one forecaster observation per sample
    tick_s: Annotated[float, Field(gt=0)] = 1.0  # reactive loop (and decision) period
    # The trend's damping phi per sample: h samples ahead a trend forecaster adds
    # phi + phi^2 + ... + phi^h samples of trend (at most phi/(1-phi): 9 at 0.9), so a
    # burst's slope is not extrapolated over the whole lead time; 1: undamped.
    trend_damping: Annotated[float, Field(gt=0, le=1)] = 0.9
    engine_start_s: Annotated[float, Field(ge=0)] = 90.0  # a new replica's time to ready
    ready_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # then a start has failed
    # No scale-down within this long of a scale-up, and none lower than the most
    # replicas asked for within this window (Kubernetes' scale-down stabilization);
    # then the whole excess goes in one step. None: engine_start_s. A replica released
    # and needed again within one engine start costs a start's worth of provisioned
    # time and a queue meanwhile; keeping it that long costs no more (the ski-rental
    # break-even), so waiting longer only adds idle replicas, shorter risks both.
    scale_down_cooldown_s: Annotated[float, Field(ge=0)] | None = None
    scale_up_cooldown_s: Annotated[float, Field(ge=0)] = 0.0
    # Requests in flight (running + waiting) one replica holds: mode reactive's target,
    # and in both modes the floor a scale-down keeps for the requests already here.
    in_flight_per_replica: Annotated[float, Field(gt=0)] = 8.0
    utilization_target: Annotated[float, Field(gt=0, le=1)] = 0.9  # of derived capacity
    # The share of calls a replica's TTFT must meet the target for: capacity is sized
    # on that quantile of the engine's steps under Poisson arrivals (``ttft_quantile_s``).
    # None: the mean step's bound, which at its capacity left 4% of calls above target.
    ttft_quantile: Annotated[float, Field(gt=0, lt=1)] | None = 0.95
    # Size for the forecast's mean + z·std of the arrival rate (not of one sample's
    # count: the queues absorb that noise; ``Forecast.upper``).
    band_z: Annotated[float, Field(ge=0)] = 1.0
    # ... and the band at most this share of the mean (``Forecast.band``); None: unbounded.
    band_max_share: Annotated[float, Field(ge=0)] | None = 0.5

    def down_window_s(self) -> float:
        """The scale-down window in force: ``scale_down_cooldown_s``, else the engine start."""
        if self.scale_down_cooldown_s is None:
            return self.engine_start_s
        return self.scale_down_cooldown_s

    @classmethod
    def from_yaml(cls, text: str) -> PlannerConfig:
        """Parse and validate YAML; ``PlannerConfigError`` names each bad field."""
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise PlannerConfigError(f"not YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise PlannerConfigError("a planner configuration is a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PlannerConfigError(_describe(exc)) from exc

    def to_yaml(self) -> str:
        """YAML of every field (the built-in defaults, written out)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "<config>"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True)
class StoredPlannerConfig:
    """One stored revision; ``config`` is None when it does not validate."""

    revision: int
    yaml_text: str
    author: str
    config: PlannerConfig | None
    error: str | None = None


@dataclass(frozen=True)
class Lease:
    """A held lease: who, until when, at which KV revision."""

    pool: str
    holder: str
    expires_at: float
    revision: int


def _config_key(pool: str) -> str:
    return f"config.{subjects.token(pool)}"


def _lease_key(pool: str) -> str:
    return f"lease.{subjects.token(pool)}"


def _decode(revision: int, raw: bytes | None) -> StoredPlannerConfig:
    text = (raw or b"").decode("utf-8", errors="replace")
    try:
        envelope = json.loads(text)
        yaml_text, author = str(envelope["yaml"]), str(envelope.get("author", ""))
    except (ValueError, TypeError, KeyError) as exc:
        return StoredPlannerConfig(revision, text, "", None, f"not a config envelope: {exc}")
    try:
        return StoredPlannerConfig(revision, yaml_text, author, PlannerConfig.from_yaml(yaml_text))
    except PlannerConfigError as exc:
        return StoredPlannerConfig(revision, yaml_text, author, None, str(exc))


class PlannerStore:
    """The planner bucket: configuration revisions (CAS, watch) and leases."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client) -> PlannerStore:
        """The bucket on ``nc``'s JetStream; created on first use."""
        js = nc.jetstream()
        try:
            kv = await js.key_value(subjects.PLANNER_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=subjects.PLANNER_BUCKET,
                    history=HISTORY,
                    description="Tandem fleet planner: configuration and leases per pool",
                )
            )
        return cls(kv)

    # -- configuration ----------------------------------------------------------------

    async def config(self, pool: str) -> StoredPlannerConfig | None:
        """The latest stored revision of ``pool``'s configuration, or None."""
        try:
            entry = await self._kv.get(_config_key(pool))
        except NotFoundError:
            return None
        assert entry.revision is not None
        return _decode(entry.revision, entry.value)

    async def set_config(
        self, pool: str, yaml_text: str, *, expect_revision: int, author: str | None = None
    ) -> int:
        """Validate and store if the stored revision is still ``expect_revision`` (0: none)."""
        PlannerConfig.from_yaml(yaml_text)  # never store what planners would refuse
        data = json.dumps(
            {
                "yaml": yaml_text,
                "author": author or who(),
                "written_at": datetime.now(UTC).isoformat(),
            }
        ).encode()
        return await self._put_raw(pool, data, expect_revision)

    async def _put_raw(self, pool: str, data: bytes, expect_revision: int) -> int:
        try:
            if expect_revision == 0:
                return await self._kv.create(_config_key(pool), data)
            return await self._kv.update(_config_key(pool), data, last=expect_revision)
        except KeyWrongLastSequenceError as exc:
            raise PlannerConfigConflictError(
                f"the configuration of {pool} changed since revision {expect_revision}"
            ) from exc

    async def watch_config(self, pool: str) -> AsyncIterator[StoredPlannerConfig]:
        """The current configuration (if any), then every new revision."""
        watcher = await self._kv.watch(_config_key(pool))
        try:
            async for entry in watcher:
                if entry is None or entry.value is None or entry.operation is not None:
                    continue
                assert entry.revision is not None
                yield _decode(entry.revision, entry.value)
        finally:
            await watcher.stop()

    # -- lease ------------------------------------------------------------------------

    async def acquire_lease(
        self, pool: str, holder: str, *, ttl_s: float, now: float | None = None
    ) -> Lease:
        """Take ``pool``'s lease; ``LeaseHeldError`` while another holder's is unexpired."""
        at = time.time() if now is None else now
        data = _lease_value(holder, at + ttl_s)
        try:
            revision = await self._kv.create(_lease_key(pool), data)
            return Lease(pool, holder, at + ttl_s, revision)
        except KeyWrongLastSequenceError:
            pass
        current = await self._read_lease(pool)
        if current is not None and current.holder != holder and current.expires_at > at:
            raise LeaseHeldError(
                f"pool {pool} is planned by {current.holder} (lease until "
                f"{datetime.fromtimestamp(current.expires_at, UTC):%H:%M:%S} UTC)"
            )
        last = current.revision if current is not None else 0
        try:  # expired, ours, or deleted: take it over, unless someone else just did
            revision = await self._kv.update(_lease_key(pool), data, last=last)
        except KeyWrongLastSequenceError as exc:
            raise LeaseHeldError(f"pool {pool}'s lease was just taken by another planner") from exc
        return Lease(pool, holder, at + ttl_s, revision)

    async def renew_lease(self, lease: Lease, *, ttl_s: float, now: float | None = None) -> Lease:
        """Extend a held lease (CAS on its revision); ``LeaseLostError`` if it was taken."""
        at = time.time() if now is None else now
        if lease.expires_at <= at:
            raise LeaseLostError(f"the lease of {lease.pool} expired before it was renewed")
        data = _lease_value(lease.holder, at + ttl_s)
        try:
            revision = await self._kv.update(_lease_key(lease.pool), data, last=lease.revision)
        except KeyWrongLastSequenceError as exc:
            raise LeaseLostError(f"the lease of {lease.pool} was taken by another planner") from exc
        return Lease(lease.pool, lease.holder, at + ttl_s, revision)

    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up (a clean stop): the next planner need not wait for it to expire."""
        try:
            await self._kv.update(
                _lease_key(lease.pool), _lease_value(lease.holder, 0.0), last=lease.revision
            )
        except KeyWrongLastSequenceError:
            pass  # taken already: nothing of ours to release

    async def _read_lease(self, pool: str) -> Lease | None:
        try:
            entry = await self._kv.get(_lease_key(pool))
        except NotFoundError:
            return None
        assert entry.revision is not None
        try:
            value: dict[str, Any] = json.loads(entry.value or b"")
            return Lease(pool, str(value["holder"]), float(value["expires_at"]), entry.revision)
        except (ValueError, TypeError, KeyError):
            return Lease(pool, "", 0.0, entry.revision)  # garbage: treat as expired


def _lease_value(holder: str, expires_at: float) -> bytes:
    return json.dumps({"holder": holder, "expires_at": expires_at}).encode()
