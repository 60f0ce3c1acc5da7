"""Demand forecasters of the fleet planner: request arrivals per second, some steps ahead.

Two short implementations in numpy-free Python, each fed one observation per sample
period and asked for the value ``h`` periods ahead with an uncertainty band:

- ``HoltWinters``: additive Holt-Winters (level + trend + a season of ``season``
  periods; ``season=0`` is Holt's linear trend). A diurnal curve is trend plus season.
- ``KalmanTrend``: the local-linear-trend state-space model (level and slope as a
  hidden state, a random walk each) estimated by a Kalman filter: it follows bursts
  quickly and its variance says how far off the forecast may be.

Both take a trend ``damping`` phi in (0, 1] (Gardner & McKenzie's damped trend; FPP3
§8.2): ``h`` periods ahead the trend adds ``(phi + phi^2 + ... + phi^h)·trend``, which
stays below ``phi/(1 - phi)`` periods' worth however far ahead. The trend is estimated
as before (on a ramp it is the ramp's slope); only its extrapolation is damped. Why:
a burst moves the slope as much as a ramp does for the first samples, and a planner
that extrapolates it over the engine's start time orders replicas for a rate nobody
measured (the benchmark once forecast 103.6 calls/s where its trace peaks at 52.5).

Why not statsforecast: it brings numba, llvmlite, scipy and pandas (hundreds of MB and
a JIT compile on first use, minutes on two cores), and refits whole series per call;
the planner needs an online update per sample, which these give in a few lines each.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

ForecasterKind = Literal["holt_winters", "kalman", "last"]


@dataclass(frozen=True)
class Forecast:
    """Expected value ``mean``; ``std``, the standard deviation of an observation (a
    sample's measured rate); ``rate_std``, that of the arrival rate itself (None: a
    forecaster that cannot tell the two apart, and ``std`` stands for both)."""

    mean: float
    std: float
    rate_std: float | None = None

    def band(self, z: float, max_share: float | None = None) -> float:
        """The half-width the planner adds to the mean: ``z·rate_std``, at most
        ``max_share`` of the mean (None: unbounded).

        The rate's uncertainty, not the sample's: the counting noise of one sample
        (Poisson over ``sample_s``) averages out in the workers' queues within seconds
        and the capacity's ``utilization_target`` leaves room for it; a band that adds
        it again provisions every replica for noise twice.

        Why a bound: an adaptive filter's variance grows with every surprise, and a burst
        is a string of them; right after one the band alone once asked for twice the
        measured peak. Bounded in proportion to the mean, it still covers a rate's
        honest doubt while it is small and stops buying replicas for past surprises.
        """
        std = self.std if self.rate_std is None else self.rate_std
        width = z * std
        if max_share is not None:
            width = min(width, max_share * max(self.mean, 0.0))
        return width

    def upper(self, z: float, max_share: float | None = None) -> float:
        """The demand the planner sizes for, ``mean + band``, never below 0."""
        return max(0.0, self.mean + self.band(z, max_share))


def damped_steps(phi: float, h: int) -> float:
    """phi + phi^2 + ... + phi^h: how many periods of trend a damped forecast adds."""
    return float(h) if phi >= 1 else phi * (1 - phi**h) / (1 - phi)


class Forecaster(Protocol):
    """One observation per period in, a forecast ``h`` periods ahead out."""

    def update(self, y: float) -> None: ...

    def forecast(self, h: int) -> Forecast: ...


class LastValue:
    """The naive forecaster: tomorrow is today (the reactive baseline)."""

    def __init__(self) -> None:
        self._last = 0.0

    def update(self, y: float) -> None:
        """Remember ``y``."""
        self._last = y

    def forecast(self, h: int) -> Forecast:
        """The last value, with no band."""
        return Forecast(self._last, 0.0)


class HoltWinters:
    """Additive Holt-Winters, updated online (Hyndman & Athanasopoulos, FPP3 §8.3).

    level_t  = alpha(y_t - s_{t-m}) + (1-alpha)(level_{t-1} + trend_{t-1})
    trend_t  = beta(level_t - level_{t-1}) + (1-beta)trend_{t-1}
    s_t      = gamma(y_t - level_t) + (1-gamma)s_{t-m}
    y_hat_{t+h}  = level_t + d_h·trend_t + s_{t+h-m(k+1)}   (the season's matching slot)

    with d_h = phi + ... + phi^h (``damped_steps``; h itself when ``damping`` is 1).
    The band is the RMS of the one-step errors seen so far, widened by sqrt(h).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.1,
        gamma: float = 0.3,
        season: int = 0,
        *,
        damping: float = 1.0,
    ) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1 and 0 <= gamma <= 1 and season >= 0):
            raise ValueError("alpha in (0, 1], beta and gamma in [0, 1], season >= 0")
        if not 0 < damping <= 1:
            raise ValueError("damping in (0, 1]")
        self.alpha, self.beta, self.gamma, self.season = alpha, beta, gamma, season
        self.damping = damping
        self._level: float | None = None
        self._trend = 0.0
        self._seasonal = [0.0] * season
        self._t = 0  # observations seen
        self._sq_err, self._n_err = 0.0, 0

    def update(self, y: float) -> None:
        """Take the next observation."""
        slot = self._t % self.season if self.season else 0
        if self._level is None:
            self._level = y
        else:
            predicted = self.forecast(1).mean
            self._sq_err += (y - predicted) ** 2
            self._n_err += 1
            s_old = self._seasonal[slot] if self.season else 0.0
            level = self.alpha * (y - s_old) + (1 - self.alpha) * (self._level + self._trend)
            self._trend = self.beta * (level - self._level) + (1 - self.beta) * self._trend
            self._level = level
            if self.season:
                self._seasonal[slot] = self.gamma * (y - level) + (1 - self.gamma) * s_old
        self._t += 1

    def forecast(self, h: int) -> Forecast:
        """y_hat ``h`` periods after the last observation."""
        if self._level is None:
            return Forecast(0.0, 0.0)
        s = self._seasonal[(self._t - 1 + h) % self.season] if self.season else 0.0
        rms = math.sqrt(self._sq_err / self._n_err) if self._n_err else 0.0
        trend = damped_steps(self.damping, h) * self._trend
        return Forecast(self._level + trend + s, rms * math.sqrt(h))


class KalmanTrend:
    """The local linear trend model, filtered (Durbin & Koopman, ch. 3).

    State x = [level, slope]; x_t = F x_{t-1} + w, F = [[1, 1], [0, 1]], w ~ N(0, Q),
    Q = diag(q_level, q_slope); observation y_t = level_t + v, v ~ N(0, r).
    Predict: x^- = F x, P^- = F P F^T + Q.
    Update: K = P^-H^T / (H P^- H^T + r), x = x^- + K(y - H x^-),
    P = (I - K H) P^-, with H = [1, 0]. h steps ahead the forecast runs the damped
    transition F_phi = [[1, phi], [0, phi]] (``damping``; F itself at phi = 1): mean
    level + (phi + ... + phi^h)·slope, the level's variance propagated through F_phi
    and Q. ``std`` adds r (a forecast of an observation); ``rate_std`` is the level's
    alone (a forecast of the rate).

    ``adaptive``: demand has no natural unit (0.5 or 500 calls/s), so r is learnt from
    the innovations and q_level, q_slope are read as fractions of it: the same filter
    fits a small pool and a large one. An innovation's variance is S = P^-_00 + r
    (the state's doubt plus the observation's noise), so r is the EWMA (weight 1/32)
    of the innovation's square times r/S, its expected share of it. Taking the whole
    square as r (as this filter once did) counts the state's doubt in r, then again
    in Q (kept in proportion to r) and in the forecast's variance.
    """

    def __init__(
        self,
        q_level: float = 1.0,
        q_slope: float = 0.05,
        r: float = 4.0,
        *,
        adaptive: bool = False,
        damping: float = 1.0,
    ) -> None:
        if min(q_level, q_slope) < 0 or r <= 0:
            raise ValueError("q_level and q_slope >= 0, r > 0")
        if not 0 < damping <= 1:
            raise ValueError("damping in (0, 1]")
        self._q_ratio = (q_level, q_slope) if adaptive else None
        self.q_level, self.q_slope, self.r = q_level, q_slope, r
        if adaptive:
            self.q_level, self.q_slope = q_level * r, q_slope * r
        self.damping = damping
        self._x: list[float] | None = None
        self._p = [[1e6, 0.0], [0.0, 1e6]]  # a diffuse prior: the first values decide

    def update(self, y: float) -> None:
        """Take the next observation."""
        if self._x is None:
            # The slope starts unknown on the data's own scale (adaptive) or unit scale.
            slope_var = self.r if self._q_ratio is not None else 1.0
            self._x, self._p = [y, 0.0], [[self.r, 0.0], [0.0, slope_var]]
            return
        x, p = self._predict(self._x, self._p, 1.0)
        s = p[0][0] + self.r
        k0, k1 = p[0][0] / s, p[1][0] / s
        innovation = y - x[0]
        if self._q_ratio is not None:  # learn the noise level, then keep Q in proportion
            share = self.r / s  # of the innovation's variance, what the observation adds
            self.r = max(1e-6, self.r + (innovation**2 * share - self.r) / 32)
            self.q_level, self.q_slope = self._q_ratio[0] * self.r, self._q_ratio[1] * self.r
        self._x = [x[0] + k0 * innovation, x[1] + k1 * innovation]
        self._p = [
            [(1 - k0) * p[0][0], (1 - k0) * p[0][1]],
            [p[1][0] - k1 * p[0][0], p[1][1] - k1 * p[0][1]],
        ]

    def _predict(
        self, x: list[float], p: list[list[float]], phi: float
    ) -> tuple[list[float], list[list[float]]]:
        # F P F^T with F = [[1, phi], [0, phi]], written out.
        p00 = p[0][0] + phi * (p[0][1] + p[1][0]) + phi * phi * p[1][1] + self.q_level
        p01 = phi * p[0][1] + phi * phi * p[1][1]
        p10 = phi * p[1][0] + phi * phi * p[1][1]
        p11 = phi * phi * p[1][1] + self.q_slope
        return [x[0] + phi * x[1], phi * x[1]], [[p00, p01], [p10, p11]]

    def forecast(self, h: int) -> Forecast:
        """The level ``h`` periods after the last observation."""
        if self._x is None:
            return Forecast(0.0, 0.0)
        x, p = self._x, self._p
        for _ in range(max(1, h)):
            x, p = self._predict(x, p, self.damping)
        return Forecast(x[0], math.sqrt(p[0][0] + self.r), math.sqrt(p[0][0]))


def make_forecaster(kind: ForecasterKind, season: int = 0, damping: float = 1.0) -> Forecaster:
    """The forecaster a planner configuration names (``damping``: of the trend)."""
    if kind == "holt_winters":
        return HoltWinters(season=season, damping=damping)
    if kind == "kalman":
        return KalmanTrend(q_level=0.25, q_slope=0.01, r=0.01, adaptive=True, damping=damping)
    return LastValue()


def _increments(
    last: dict[str, tuple[int, ...]], counters: Mapping[str, tuple[int, ...]]
) -> list[int]:
    """The pool's summed increments of each worker's cumulative counters since ``last``,
    which is updated. A worker first seen, or whose first counter went down (it
    restarted), contributes its counters whole: what it counted since it started."""
    added: list[int] = []
    for worker, totals in counters.items():
        before = last.get(worker)
        if before is None or totals[0] < before[0]:
            step = totals
        else:
            step = tuple(t - b for t, b in zip(totals, before, strict=True))
        added = [a + s for a, s in zip(added, step, strict=True)] if added else list(step)
        last[worker] = totals
    return added


class ShapeMeter:
    """Mean prompt and output tokens of the pool's recent requests, from the workers'
    cumulative counters (``requests_total``, ``prompt_tokens_total``,
    ``output_tokens_total``), weighted by recency: each observation's increments add to
    sums that decay with a ``half_life_s``.

    Why not the counters' totals: they average a worker's whole life, so the capacity
    the planner derives from them lags a change of workload by hours, and jumps when a
    long-lived worker drains or a fresh one joins (the sum's members change). The
    increments only see requests, wherever they ran.
    """

    def __init__(self, half_life_s: float) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s > 0")
        self._half_life_s = half_life_s
        self._last: dict[str, tuple[int, ...]] = {}
        self._at: float | None = None
        self.requests = self._prompt = self._output = 0.0  # decayed sums

    def seed(self, counters: dict[str, tuple[int, int, int]]) -> None:
        """Take the counters as a baseline: requests served before the planner looked."""
        self._last.update(counters)

    def observe(self, at: float, counters: dict[str, tuple[int, int, int]]) -> None:
        """Each worker's (requests, prompt tokens, output tokens) as seen at ``at``."""
        added = _increments(self._last, counters) or [0, 0, 0]
        decay = 1.0 if self._at is None else 0.5 ** ((at - self._at) / self._half_life_s)
        self._at = at
        self.requests = self.requests * decay + added[0]
        self._prompt = self._prompt * decay + added[1]
        self._output = self._output * decay + added[2]

    def means(self) -> tuple[float, float] | None:
        """(prompt, output) tokens per request; None before any request was seen."""
        if self.requests <= 0:
            return None
        return self._prompt / self.requests, self._output / self.requests


class RateMeter:
    """Arrivals per second of a pool, from the workers' cumulative ``requests_total``.

    Each worker's counter is differenced against its previous beat (a restarted worker,
    whose counter went down, contributes its new count); the pool's rate is the sum of
    the increments over the window's seconds.
    """

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._last: dict[str, tuple[int, ...]] = {}
        self._events: deque[tuple[float, int]] = deque()

    def observe(self, at: float, counters: dict[str, int]) -> None:
        """Record each worker's ``requests_total`` as seen at ``at``."""
        added = _increments(self._last, {w: (total,) for w, total in counters.items()})
        self._events.append((at, added[0] if added else 0))
        # Keep the previous observation at least: samples come about a window apart.
        while len(self._events) > 2 and self._events[0][0] < at - self._window_s:
            self._events.popleft()

    def seed(self, counters: dict[str, int]) -> None:
        """Take the counters as a baseline (their past is not this window's arrivals)."""
        self._last.update({w: (total,) for w, total in counters.items()})

    def rate(self) -> float:
        """Arrivals per second over the window (0 before two observations)."""
        if len(self._events) < 2:
            return 0.0
        span = self._events[-1][0] - self._events[0][0]
        return sum(n for _, n in list(self._events)[1:]) / span if span > 0 else 0.0
