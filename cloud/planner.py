"""The fleet planner: sizes a pool of cloud workers ahead of demand, and drains on the way down.

Every ``tick_s`` the planner (one per pool, holding the pool's lease in NATS KV):

1. reads the pool's load from the mesh's heartbeats (``FleetView``): which workers are
   ready, how many requests wait, and their cumulative arrivals (``requests_total``);
2. every ``sample_s`` feeds the measured arrival rate to a forecaster
   (``cloud.planner_forecast``) and asks it for the demand over the lead time, the
   engine's start time plus one sample (a replica ordered now serves only then);
3. converts demand into replicas with ``replica_capacity_rps``: what one replica can
   take within the SLO, derived from the engine's latency profile (``models.latency``,
   the same model the simulated engine runs), so capacity is computed, not guessed;
4. guards with the queue: waiting requests beyond ``reactive.waiting_per_replica`` per
   ready replica ask for more at once, whatever the forecast said;
5. clamps to the bounds, honours the cooldowns, and acts through a connector: scale-up
   starts replicas at once; scale-down goes to the most replicas asked for within the
   cooldown window, draining the whole excess in one step (the least-loaded workers
   the connector can remove, each finishing its requests), never below the minimum
   nor below what the requests in flight need. A failing connector is retried with
   exponential backoff; its failures are decisions too.

Every decision is a ``PlannerDecision`` with its inputs, logged and published on
``subjects.planner_decisions(pool)``; Prometheus gauges show desired and ready replicas.

    planner = Planner(nc, "default", connector, profile=LatencyProfile.default().cloud)
    await planner.start()            # LeaseHeldError if another planner runs the pool
    await planner.run(stop_event)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from nats.aio.client import Client
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud.planner_config import (
    ConnectorError,
    Lease,
    LeaseLostError,
    PlannerConfig,
    PlannerStore,
    StoredPlannerConfig,
)
from cloud.planner_forecast import Forecast, Forecaster, RateMeter, ShapeMeter, make_forecaster
from mesh import subjects
from mesh.heartbeat import FleetView
from mesh.protocol import NodeHeartbeat, PlannerDecision
from models.latency import EngineProfile
from router.store import PolicyStore

logger = logging.getLogger(__name__)

__all__ = ["Connector", "Planner", "Sizing", "decide", "replica_capacity_rps"]

Mode = Literal["predictive", "reactive"]
LEASE_TTL_S = 15.0
# Requests (recency-weighted, ``ShapeMeter``) before the measured shape replaces the
# configured one: fewer, and one long prompt would size the pool.
_TRUST_REQUESTS = 20.0
_RETRY_BASE_S, _RETRY_MAX_S = 1.0, 60.0


# -- sizing: pure math ---------------------------------------------------------------------


def step_time_s(
    profile: EngineProfile, rps: float, prompt_tokens: float, output_tokens: float
) -> float:
    """Steady-state engine step of one replica taking ``rps`` arrivals (inf: overloaded).

    The simulated engine's step (``cloud.sim_engine``) lasts ``tpot(B) = c + d·B`` for
    its B decoding sequences, plus ``slope`` per prompt token and ``fixed`` per prompt
    it prefills. Per second of engine time, prefill takes rho = rps·(P·slope + fixed), so
    a step lasts s = (c + d·B) / (1 - rho). By Little's law the decoding batch is
    B = rps·O·s (each request decodes for O steps). Substituting B:
    s·(1 - rho) = c + d·rps·O·s  ⇒  s = c / (1 - rho - d·rps·O), finite while the
    denominator is positive.
    """
    c, d = profile.tpot.intercept, profile.tpot.slope
    rho = rps * (prompt_tokens * profile.prefill_s_per_token + profile.prefill_fixed_s)
    denominator = 1.0 - rho - d * rps * output_tokens
    if denominator <= 0:
        return math.inf
    return max(c, 1e-4) / denominator


def meets_slo(
    profile: EngineProfile,
    rps: float,
    prompt_tokens: float,
    output_tokens: float,
    ttft_s: float,
    itl_s: float,
    ttft_quantile: float | None = None,
) -> bool:
    """Whether one replica taking ``rps`` meets both targets in the steady state.

    ITL is one step. TTFT (``ttft_quantile`` None) is the wait for the next step to
    begin (up to one step), then the step that prefills the prompt (a step plus the
    prompt's own prefill): 2·s + P·slope + fixed, the mean step's bound. With
    ``ttft_quantile`` q, TTFT is that quantile of the engine's steps under Poisson
    arrivals (``ttft_quantile_s``): the bound a share q of calls must meet.
    """
    s = step_time_s(profile, rps, prompt_tokens, output_tokens)
    if s > itl_s or rps * output_tokens * s > profile.max_batch:
        return False  # before TTFT: its quantile is a simulation
    if ttft_quantile is None:
        first_token = 2 * s + prompt_tokens * profile.prefill_s_per_token + profile.prefill_fixed_s
    else:
        first_token = ttft_quantile_s(profile, rps, prompt_tokens, output_tokens, ttft_quantile)
    return first_token <= ttft_s


# Arrival times of a unit-rate Poisson process, seeded: 6,000 calls per quantile, 60
# beyond the 99th percentile. Scaled by 1/rps for each rate (common random numbers).
_GAPS_RNG = random.Random(16)
_UNIT_ARRIVALS = tuple(itertools.accumulate(_GAPS_RNG.expovariate(1.0) for _ in range(6000)))
del _GAPS_RNG


def ttft_quantile_s(
    profile: EngineProfile,
    rps: float,
    prompt_tokens: float,
    output_tokens: float,
    quantile: float,
) -> float:
    """The ``quantile`` of TTFT at one replica taking Poisson arrivals at ``rps``
    (inf: overloaded), by running the simulated engine's step rule on the profile.

    Why not the mean step: a queue group hands each call to a replica at random, so
    each replica sees Poisson arrivals, and prompts come in clumps. A step prefills the
    prompts that arrived before it (within ``max_step_tokens``), so it lasts longer the
    more came, and a long step gathers more prompts for the next one. The tail of TTFT
    is this chain's: at 0.88 of the mean-step capacity the benchmark's peak-sized fleet
    saw a TTFT P99 of 2.7 s against a 2 s bound. The decoding batch is held at its
    steady mean (``rps·O·s``). The gaps are fixed (unit exponentials scaled by 1/rps:
    common random numbers), so the result is deterministic and grows with ``rps``, and
    the capacity's bisection is stable; the first 5% of calls (an empty engine) are
    left out.
    """
    s = step_time_s(profile, rps, prompt_tokens, output_tokens)
    if math.isinf(s) or rps <= 0:
        return math.inf
    batch = rps * output_tokens * s
    decode_s = profile.tpot.intercept + profile.tpot.slope * batch
    per_token, fixed = profile.prefill_s_per_token, profile.prefill_fixed_s
    budget = max(1.0, profile.max_step_tokens - batch)
    arrivals = [at / rps for at in _UNIT_ARRIVALS]
    waiting: deque[list[float]] = deque()  # [arrived at, prompt tokens left, started]
    ttfts: list[float] = []
    now, i = 0.0, 0
    while len(ttfts) < len(arrivals):
        while i < len(arrivals) and arrivals[i] <= now:
            waiting.append([arrivals[i], prompt_tokens, 0.0])
            i += 1
        if not waiting:  # decode steps go on; the next arrival joins at a step's end
            now += decode_s * math.ceil((arrivals[i] - now) / decode_s)
            continue
        step, left, done = decode_s, budget, 0
        for item in waiting:
            if left <= 0:
                break
            chunk = min(left, item[1])
            step += chunk * per_token + (fixed if not item[2] else 0.0)
            item[1], item[2], left = item[1] - chunk, 1.0, left - chunk
            done += item[1] <= 0
        now += step
        for _ in range(done):
            ttfts.append(now - waiting.popleft()[0])
        if now - arrivals[min(i, len(arrivals) - 1)] > 600:  # a queue that only grows
            return math.inf
    tail = sorted(ttfts[len(ttfts) // 20 :])
    return tail[min(len(tail) - 1, int(quantile * len(tail)))]


def replica_capacity_rps(
    profile: EngineProfile,
    prompt_tokens: float,
    output_tokens: float,
    ttft_s: float,
    itl_s: float,
    ttft_quantile: float | None = None,
) -> float:
    """The most arrivals per second one replica takes within the SLO (0: never met).

    ``meets_slo`` is monotone in rps (the step only grows with load), so bisect, to
    0.1%. Cached: the planner asks every tick, mostly for the same shape.
    """
    key = (id(profile), prompt_tokens, output_tokens, ttft_s, itl_s, ttft_quantile)
    hit = _CAPACITIES.get(key)
    if hit is not None and hit[0] is profile:
        return hit[1]
    if len(_CAPACITIES) > 256:
        _CAPACITIES.clear()
    value = _capacity(profile, prompt_tokens, output_tokens, ttft_s, itl_s, ttft_quantile)
    _CAPACITIES[key] = (profile, value)
    return value


# (profile id, shape, targets): (the profile, its capacity). Keyed by identity: a
# profile holds its samples in lists, so it is not hashable.
_CAPACITIES: dict[tuple[object, ...], tuple[EngineProfile, float]] = {}


def _capacity(
    profile: EngineProfile,
    prompt_tokens: float,
    output_tokens: float,
    ttft_s: float,
    itl_s: float,
    ttft_quantile: float | None,
) -> float:
    def ok(rps: float) -> bool:
        return meets_slo(profile, rps, prompt_tokens, output_tokens, ttft_s, itl_s, ttft_quantile)

    if not ok(1e-9):
        return 0.0
    low, high = 0.0, 1.0
    while ok(high):
        low, high = high, high * 2
        if high > 1e6:
            return high
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class Sizing:
    """What one step decides from: the pool as seen, the demand expected, the clocks."""

    now: float
    provisioned: int  # workers the connector runs
    ready: int  # of them, heard from and not draining
    starting: int  # provisioned but not yet heard from
    waiting: int
    in_flight: int  # running + waiting over the ready workers
    measured_rps: float
    forecast_rps: float  # the band's upper edge over the lead time
    capacity_rps: float
    last_up_at: float
    # The most replicas ``desired_replicas`` asked for within the scale-down window
    # before now (``PlannerConfig.down_window_s``; 0: no history).
    recent_desired: int = 0
    # ``forecast_rps`` is their sum (never below 0): the record of what it was made of.
    forecast_mean_rps: float = 0.0
    forecast_band_rps: float = 0.0
    # How long this planner has measured the demand: none of it for its first seconds,
    # when a rate of 0 means "not seen yet", not "nothing to serve".
    observed_s: float = math.inf


def desired_replicas(config: PlannerConfig, sizing: Sizing, mode: Mode) -> tuple[int, str]:
    """Replicas the demand asks for, before bounds and cooldowns, and why."""
    if mode == "reactive":  # KEDA/HPA: desired = ceil(in-flight / target per replica)
        return math.ceil(sizing.in_flight / config.in_flight_per_replica), (
            f"in flight {sizing.in_flight} / {config.in_flight_per_replica:g} per replica"
        )
    capacity = sizing.capacity_rps * config.utilization_target
    demand = max(sizing.forecast_rps, sizing.measured_rps)
    want = math.ceil(demand / capacity) if capacity > 0 else config.bounds.max_replicas
    reason = f"demand {demand:.2f} rps / {capacity:.2f} rps per replica"
    queue_need = _queue_need(config, sizing)
    if queue_need > want:
        per_replica = config.reactive.waiting_per_replica
        want, reason = queue_need, f"queue {sizing.waiting} > {per_replica:g} per ready replica"
    return want, reason


def _queue_need(config: PlannerConfig, sizing: Sizing) -> int:
    """Replicas the queue asks for: one more per ``waiting_per_replica`` requests waiting
    beyond what the ready ones absorb (0 while they absorb it all)."""
    per_replica = config.reactive.waiting_per_replica
    if sizing.waiting <= per_replica * max(sizing.ready, 1):
        return 0
    return sizing.ready + math.ceil((sizing.waiting - per_replica * sizing.ready) / per_replica)


def decide(
    config: PlannerConfig, sizing: Sizing, mode: Mode = "predictive"
) -> tuple[str, int, int, str]:
    """(action, desired, target, reason) of one step: bounds, cooldowns, drain safety.

    Scale-up is immediate (to ``desired``, clamped). Scale-down goes to the most that
    was asked within the cooldown window (``recent_desired``), all of the excess in one
    step, but never below the minimum, never below what the requests in flight need
    (``in_flight_per_replica`` each), never while a replica starts (it may be what the
    demand waits for), and only over ready replicas (each drained one finishes its own
    requests; the ones left take the arrivals).
    """
    bounds = config.bounds
    desired, reason = desired_replicas(config, sizing, mode)
    floor = bounds.min_replicas
    if bounds.scale_to_zero and floor == 0 and (sizing.forecast_rps > 0 or sizing.in_flight > 0):
        floor = 1  # zero only when nothing is expected and nothing is in flight
    target = min(max(desired, floor), bounds.max_replicas)
    have = sizing.provisioned
    if target > have:
        if sizing.now - sizing.last_up_at < config.scale_up_cooldown_s:
            return "hold", desired, have, f"{reason}; scale-up cooldown"
        return "scale_up", desired, target, reason
    if target < have:
        if sizing.observed_s < config.down_window_s():
            # A planner (re)started on a busy fleet has not seen its demand yet: it once
            # drained 4 replicas to 1 in its first second, on a rate of 0 not yet measured.
            why = f"measuring demand ({sizing.observed_s:.0f} s of {config.down_window_s():g} s)"
            return "hold", desired, have, f"{reason}; {why} before any scale-down"
        if sizing.starting:
            return "hold", desired, have, f"{reason}; {sizing.starting} replica(s) still starting"
        if sizing.now - sizing.last_up_at < config.down_window_s():
            return "hold", desired, have, f"{reason}; scale-down cooldown after a scale-up"
        in_flight_need = math.ceil(sizing.in_flight / config.in_flight_per_replica)
        keep = min(max(target, sizing.recent_desired, in_flight_need), bounds.max_replicas)
        # Only ready replicas drain, and the ready ones left must hold ``keep`` alone.
        drain = min(have - keep, sizing.ready - keep)
        if keep > target:
            reason = (
                f"{reason}; keeping {keep} (window {sizing.recent_desired}, "
                f"in flight {in_flight_need}) on {sizing.ready} ready"
            )
        if drain <= 0:
            return "hold", desired, have, reason
        down_to = have - drain
        return "scale_down", desired, down_to, reason
    return "hold", desired, have, reason


# -- connectors -------------------------------------------------------------------------


class Connector(Protocol):
    """How a planner starts and drains workers of its pool (local processes, Kubernetes)."""

    async def workers(self) -> list[str]:
        """Ids of the workers provisioned now (ready or starting), as they name themselves."""
        ...

    async def scale_up(self, count: int) -> list[str]:
        """Start ``count`` more workers; their ids. ``ConnectorError`` on failure."""
        ...

    async def drain(self, worker_id: str) -> None:
        """Remove ``worker_id`` after it drains (SIGTERM: in-flight requests finish)."""
        ...

    def removable(self, worker_ids: list[str]) -> list[str]:
        """Which of these workers the connector can remove (a StatefulSet: the last only)."""
        ...


# -- the loop ----------------------------------------------------------------------------


def _forecaster_of(config: PlannerConfig) -> tuple[object, ...]:
    """What a forecaster is built from: a change of any rebuilds it (its state is lost)."""
    return (config.forecaster, config.season_periods, config.trend_damping)


class Planner:
    """One pool's planner: lease, live configuration, forecast, decisions, connector."""

    def __init__(
        self,
        nc: Client,
        pool: str,
        connector: Connector,
        *,
        profile: EngineProfile,
        config: PlannerConfig | None = None,
        mode: Mode = "predictive",
        planner_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.nc, self.pool, self.connector, self.profile, self.mode = (
            nc,
            pool,
            connector,
            profile,
            mode,
        )
        self.planner_id = planner_id or f"planner-{uuid.uuid4().hex[:8]}"
        self.config = config or PlannerConfig()
        self.config_revision: int | None = None
        self.rejected: StoredPlannerConfig | None = None
        self._clock = clock
        self.fleet = FleetView(nc, clock=clock)
        self._store: PlannerStore | None = None
        self._lease: Lease | None = None
        self._forecaster: Forecaster = self._make_forecaster(self.config)
        self._meter = RateMeter(window_s=self.config.sample_s)
        self._shape = ShapeMeter(self.config.workload.measured_half_life_s)
        self._next_sample_at = -math.inf
        self._rate = 0.0
        self._last_up_at = -math.inf
        self._first_tick_at: float | None = None  # when this planner began measuring
        self._desired: deque[tuple[float, int]] = deque()  # (when, desired): the window
        self._started: dict[str, float] = {}  # worker id: when it was ordered
        self._failures, self._retry_at = 0, -math.inf
        self._tasks: list[asyncio.Task[None]] = []
        # The routing policy's slo (TTFT, ITL ms), followed live: the targets a config
        # that sets none sizes for (``PlannerConfig.slo``).
        self.policy_slo: tuple[float | None, float | None] = (None, None)
        self.decisions: list[PlannerDecision] = []  # this process's, for benches and tests
        self.registry = registry or CollectorRegistry()
        self._gauges = {
            name: Gauge(f"tandem_planner_{name}_replicas", help_, ["pool"], registry=self.registry)
            for name, help_ in (
                ("desired", "replicas the demand asks for"),
                ("target", "replicas the planner set the pool to"),
                ("ready", "replicas heard from and not draining"),
                ("provisioned", "replicas the connector runs"),
            )
        }
        self._forecast_gauge = Gauge(
            "tandem_planner_forecast_rps",
            "demand expected over the lead time",
            ["pool"],
            registry=self.registry,
        )
        self._actions = Counter(
            "tandem_planner_decisions",
            "planner decisions by action",
            ["pool", "action"],
            registry=self.registry,
        )

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Take the pool's lease (``LeaseHeldError`` if held), follow config and load."""
        self._store = await PlannerStore.open(self.nc)
        self._lease = await self._store.acquire_lease(self.pool, self.planner_id, ttl_s=LEASE_TTL_S)
        stored = await self._store.config(self.pool)
        if stored is not None:
            self.apply(stored)
        await self.fleet.start()
        self._tasks.append(asyncio.create_task(self._follow_config(), name="planner-config"))
        self._tasks.append(asyncio.create_task(self._renew_lease(), name="planner-lease"))
        self._tasks.append(asyncio.create_task(self._follow_policy(), name="planner-policy"))
        logger.info("planner %s holds pool %s (mode %s)", self.planner_id, self.pool, self.mode)

    async def stop(self) -> None:
        """Stop following and give the lease back; the fleet stays as it is."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.fleet.stop()
        if self._store is not None and self._lease is not None:
            with contextlib.suppress(Exception):
                await self._store.release_lease(self._lease)
            self._lease = None

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``tick_s`` until ``stop`` is set or the lease is lost."""
        while not stop.is_set():
            if self._lease is None:
                raise LeaseLostError(f"planner {self.planner_id} lost the lease of {self.pool}")
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.tick_s)

    # -- configuration ------------------------------------------------------------------

    def apply(self, stored: StoredPlannerConfig) -> bool:
        """Switch to ``stored`` if valid and new; an invalid one is logged and refused."""
        if self.config_revision is not None and stored.revision <= self.config_revision:
            return True
        if stored.config is None:
            if self.rejected is None or self.rejected.revision != stored.revision:
                logger.error(
                    "planner config revision %d of %s is invalid; keeping %s: %s",
                    stored.revision,
                    self.pool,
                    self.config_revision or "the built-in one",
                    stored.error,
                )
            self.rejected = stored
            return False
        old = self.config
        self.config, self.config_revision = stored.config, stored.revision
        if _forecaster_of(old) != _forecaster_of(stored.config):
            self._forecaster = self._make_forecaster(stored.config)
        if old.sample_s != stored.config.sample_s:
            self._meter = RateMeter(window_s=stored.config.sample_s)
        if old.workload.measured_half_life_s != stored.config.workload.measured_half_life_s:
            self._shape = ShapeMeter(stored.config.workload.measured_half_life_s)
            self._next_sample_at = -math.inf  # re-seed both meters on the next sample
        logger.info("planner config revision %d of %s applied", stored.revision, self.pool)
        return True

    @staticmethod
    def _make_forecaster(config: PlannerConfig) -> Forecaster:
        return make_forecaster(config.forecaster, config.season_periods, config.trend_damping)

    async def _follow_config(self) -> None:
        assert self._store is not None
        while True:
            try:
                async for stored in self._store.watch_config(self.pool):
                    self.apply(stored)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: re-watch
                logger.debug("planner config watch interrupted (%s)", exc)
            await asyncio.sleep(1.0)

    def slo_targets_ms(self) -> tuple[float, float]:
        """(TTFT, ITL) the pool is sized for: the config's, the policy's, or the defaults."""
        return self.config.slo.resolve(*self.policy_slo)

    async def _follow_policy(self) -> None:
        """Keep ``policy_slo`` on the routing policy's last valid revision (read only)."""
        while True:
            try:
                store = await PolicyStore.open(self.nc, create=False)  # operators create it
                async for stored in store.watch():
                    if stored.policy is not None:  # an invalid revision: keep the last good
                        slo = stored.policy.slo
                        if (slo.ttft_p95_ms, slo.itl_p95_ms) != self.policy_slo:
                            self.policy_slo = (slo.ttft_p95_ms, slo.itl_p95_ms)
                            logger.info("planner %s: routing policy slo %s", self.pool, slo)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no policy bucket yet, or NATS away: look again
                logger.debug("planner policy watch interrupted (%s)", exc)
            await asyncio.sleep(2.0)

    async def _renew_lease(self) -> None:
        assert self._store is not None
        while self._lease is not None:
            await asyncio.sleep(LEASE_TTL_S / 3)
            try:
                self._lease = await self._store.renew_lease(self._lease, ttl_s=LEASE_TTL_S)
            except LeaseLostError:
                logger.error(
                    "planner %s lost the lease of %s; it stops acting", self.planner_id, self.pool
                )
                self._lease = None
            except Exception as exc:  # NATS away: try again before the lease runs out
                logger.warning("renewing the lease of %s failed: %s", self.pool, exc)

    # -- one step -------------------------------------------------------------------

    def _pool_beats(self, ids: set[str]) -> list[NodeHeartbeat]:
        return [
            b for b in self.fleet.nodes(max_age_s=5.0)
            if b.role == "cloud" and b.model == self.config.model and b.node_id in ids
        ]  # fmt: skip

    def _observe(self, now: float, beats: list[NodeHeartbeat]) -> None:
        counters = {
            b.node_id: b.load.requests_total for b in beats if b.load.requests_total is not None
        }
        if now < self._next_sample_at:
            return
        first = self._next_sample_at == -math.inf
        self._next_sample_at = now + self.config.sample_s
        shapes: dict[str, tuple[int, int, int]] = {}
        for b in beats:
            n, p, o = b.load.requests_total, b.load.prompt_tokens_total, b.load.output_tokens_total
            if n is not None and p is not None and o is not None:
                shapes[b.node_id] = (n, p, o)
        if first:
            self._meter.seed(counters)
            self._shape.seed(shapes)
        self._meter.observe(now, counters)
        self._shape.observe(now, shapes)
        self._rate = self._meter.rate()
        if not first:
            self._forecaster.update(self._rate)

    def forecast(self) -> Forecast:
        """The highest upper band over the lead time: engine start plus one sample."""
        c = self.config
        horizon = max(1, math.ceil((c.engine_start_s + c.sample_s) / c.sample_s))
        forecasts = [self._forecaster.forecast(h) for h in range(1, horizon + 1)]
        return max(forecasts, key=lambda f: f.upper(c.band_z, c.band_max_share))

    def capacity_rps(self) -> tuple[float, float, float]:
        """One replica's capacity for the request shape measured (or configured), with
        the prompt tokens it prefills and the output tokens it decodes per request."""
        w = self.config.workload
        prompt, output = w.prompt_tokens, w.output_tokens
        measured = self._shape.means()
        if measured is not None and self._shape.requests >= _TRUST_REQUESTS:
            prompt, output = measured[0], max(1.0, measured[1])
        uncached = prompt * (1 - w.cached_share)
        ttft_ms, itl_ms = self.slo_targets_ms()
        # Rounded to whole tokens: the capacity is cached per shape (a simulation each).
        uncached, output = round(uncached), round(output)
        cap = replica_capacity_rps(
            self.profile, uncached, output, ttft_ms / 1e3, itl_ms / 1e3, self.config.ttft_quantile
        )
        return cap, uncached, output

    async def tick(self) -> PlannerDecision:
        """One planning step: observe, forecast, decide, act, publish."""
        now = self._clock()
        if self._first_tick_at is None:
            self._first_tick_at = now
        try:
            provisioned = await self.connector.workers()
        except ConnectorError as exc:
            return await self._failed(now, 0, 0, 0, str(exc))
        ids = set(provisioned)
        beats = self._pool_beats(ids)
        ready = [b for b in beats if not b.load.draining]
        heard = {b.node_id for b in beats}
        for worker_id in heard:
            self._started.pop(worker_id, None)
        starting = [w for w in provisioned if w not in heard]
        self._observe(now, beats)
        capacity, _, _ = self.capacity_rps()
        ahead, c = self.forecast(), self.config
        sizing = Sizing(
            now=now,
            provisioned=len(provisioned),
            ready=len(ready),
            starting=len(starting),
            waiting=sum(b.load.waiting for b in ready),
            in_flight=sum(b.load.waiting + b.load.running for b in ready),
            measured_rps=self._rate,
            forecast_rps=ahead.upper(c.band_z, c.band_max_share),
            capacity_rps=capacity,
            last_up_at=self._last_up_at,
            observed_s=now - self._first_tick_at,
            recent_desired=self._recent_desired(now),
            forecast_mean_rps=ahead.mean,
            forecast_band_rps=ahead.band(c.band_z, c.band_max_share),
        )
        stuck = [
            w for w in starting if now - self._started.get(w, now) > self.config.ready_timeout_s
        ]
        if stuck:
            return await self._give_up_on(now, sizing, stuck)
        action, desired, target, reason = decide(self.config, sizing, self.mode)
        self._desired.append((now, desired))
        if action != "hold" and now < self._retry_at:
            action, target, reason = (
                "hold",
                sizing.provisioned,
                f"{reason}; retrying after a failure",
            )
        if action == "scale_down":
            return await self._scale_down(sizing, desired, target, reason, ready)
        if action == "scale_up":
            try:
                for worker_id in await self.connector.scale_up(target - sizing.provisioned):
                    self._started[worker_id] = now
            except ConnectorError as exc:
                return await self._failed(
                    now, sizing.provisioned, sizing.ready, desired, str(exc), sizing
                )
            self._last_up_at = now
            self._failures = 0
        return await self._publish(
            self._decision(action, reason, sizing, desired, target, None, None)
        )

    def _recent_desired(self, now: float) -> int:
        """The most replicas asked for within the scale-down window before ``now``."""
        window = self.config.down_window_s()
        while self._desired and self._desired[0][0] < now - window:
            self._desired.popleft()
        return max((d for _, d in self._desired), default=0)

    async def _scale_down(
        self, sizing: Sizing, desired: int, target: int, reason: str, ready: list[NodeHeartbeat]
    ) -> PlannerDecision:
        """Drain the least-loaded removable workers down to ``target``: one decision each.

        One at a time: the connector says which are removable among those left (a
        StatefulSet: its highest ordinal, a new one after each drain), and a failure
        part-way leaves the decisions published for the drains that happened.
        """
        left, decision = list(ready), None
        for provisioned_after in range(sizing.provisioned - 1, target - 1, -1):
            worker_id = self._least_loaded(left)
            if worker_id is None:
                break
            try:
                await self.connector.drain(worker_id)
            except ConnectorError as exc:
                return await self._failed(
                    sizing.now, sizing.provisioned, sizing.ready, desired, str(exc), sizing
                )
            self._failures = 0
            left = [b for b in left if b.node_id != worker_id]
            decision = await self._publish(
                self._decision(
                    "scale_down", reason, sizing, desired, provisioned_after, worker_id, None
                )
            )
        if decision is None:
            why = f"{reason}; no removable ready replica"
            decision = await self._publish(
                self._decision("hold", why, sizing, desired, sizing.provisioned, None, None)
            )
        return decision

    def _least_loaded(self, ready: list[NodeHeartbeat]) -> str | None:
        removable = set(self.connector.removable([b.node_id for b in ready]))
        candidates = [b for b in ready if b.node_id in removable]
        if not candidates:
            return None
        return min(candidates, key=lambda b: (b.load.running + b.load.waiting, b.node_id)).node_id

    async def _give_up_on(self, now: float, sizing: Sizing, stuck: list[str]) -> PlannerDecision:
        for worker_id in stuck:
            self._started.pop(worker_id, None)
            with contextlib.suppress(ConnectorError):
                await self.connector.drain(worker_id)
        timeout = self.config.ready_timeout_s
        message = f"worker(s) {', '.join(stuck)} not ready in {timeout:.0f} s; removed"
        return await self._failed(
            now, sizing.provisioned, sizing.ready, sizing.provisioned, message, sizing
        )

    async def _failed(
        self,
        now: float,
        provisioned: int,
        ready: int,
        desired: int,
        message: str,
        sizing: Sizing | None = None,
    ) -> PlannerDecision:
        self._failures += 1
        delay = min(_RETRY_MAX_S, _RETRY_BASE_S * 2 ** (self._failures - 1))
        self._retry_at = now + delay
        logger.error(
            "planner %s: connector failed (retry in %.0f s): %s", self.pool, delay, message
        )
        sizing = sizing or Sizing(now, provisioned, ready, 0, 0, 0, self._rate, 0.0, 0.0, 0.0)
        decision = self._decision(
            "error", f"retry in {delay:.0f} s", sizing, desired, provisioned, None, message
        )
        return await self._publish(decision)

    def _decision(
        self,
        action: str,
        reason: str,
        s: Sizing,
        desired: int,
        target: int,
        drained: str | None,
        error: str | None,
    ) -> PlannerDecision:
        capacity = s.capacity_rps * self.config.utilization_target
        ttft_target_ms, itl_target_ms = self.slo_targets_ms()
        headroom = 1 - s.forecast_rps / (s.ready * capacity) if s.ready and capacity > 0 else 0.0
        return PlannerDecision(
            pool=self.pool,
            planner_id=self.planner_id,
            model=self.config.model,
            config_revision=self.config_revision,
            action=action,  # type: ignore[arg-type]
            reason=reason,
            provisioned=s.provisioned,
            ready=s.ready,
            desired=desired,
            target=target,
            measured_rps=round(s.measured_rps, 4),
            forecast_rps=round(s.forecast_rps, 4),
            forecast_mean_rps=round(s.forecast_mean_rps, 4),
            forecast_band_rps=round(s.forecast_band_rps, 4),
            capacity_rps=round(s.capacity_rps, 4),
            waiting=s.waiting,
            ttft_target_ms=ttft_target_ms,
            itl_target_ms=itl_target_ms,
            headroom=round(headroom, 4),
            drained=drained,
            error=error,
        )

    async def _publish(self, decision: PlannerDecision) -> PlannerDecision:
        self.decisions.append(decision)
        if decision.action != "hold":
            logger.info("planner decision: %s", decision.model_dump_json())
        else:  # one a tick: the inputs are on the mesh and in /metrics as well
            logger.debug("planner decision: %s", decision.model_dump_json())
        for name, value in (
            ("desired", decision.desired),
            ("target", decision.target),
            ("ready", decision.ready),
            ("provisioned", decision.provisioned),
        ):
            self._gauges[name].labels(self.pool).set(value)
        self._forecast_gauge.labels(self.pool).set(decision.forecast_rps)
        self._actions.labels(self.pool, decision.action).inc()
        with contextlib.suppress(Exception):  # visibility is best effort; the action stands
            await self.nc.publish(subjects.planner_decisions(self.pool), decision.to_bytes())
        return decision
