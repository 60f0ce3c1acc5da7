"""The latency model of the simulated engines, fitted from a real calibration run.

A simulated engine replaces the forward pass with two straight lines, each fitted
by ordinary least squares to timings of the real engine on this machine:

- time to first token against the prompt tokens that had to be evaluated
  (prefill is linear in the uncached prompt: ``ttft(L) = a + b·L``);
- time per output token against the running batch (one decode step serves
  every running sequence; its cost grows with the batch: ``tpot(B) = c + d·B``).

A ``LatencyProfile`` holds one ``EngineProfile`` per role (the edge's llama.cpp,
the cloud's vLLM), the samples they were fitted to, and where and when they were
measured. Its ``disaggregation`` part models a prefill/decode split: a prefill
worker's engine, a decode worker's, and the KV hand-over between them
(``transfer_s(tokens) = fixed + per_token·tokens``); until a calibration run fills it
in, it says so (``calibrated: false``) and the workers' engines default to the
monolithic cloud profile. ``bench/calibrate.py`` writes one; the default profile ships in
``models/profiles/``. Everything a simulated engine produces is labelled
simulated, whatever profile it runs.

    >>> profile = LatencyProfile.default()
    >>> round(profile.cloud.tpot_s(8), 4) > round(profile.cloud.tpot_s(1), 4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from models.errors import ModelError

DEFAULT_PROFILE = "default.json"
# A step can never take less than this, whatever the fitted line says at small x.
_MIN_STEP_S = 1e-4


class EngineKind(StrEnum):
    """Which engine a role runs (``--engine``): the real one, or the simulated one on a profile.

    One vocabulary for every role: ``real`` is llama.cpp on an edge and vLLM on a
    cloud worker; ``sim`` replaces either forward pass with this module's latency model.
    """

    REAL = "real"
    SIM = "sim"


class LatencyProfileError(ModelError):
    """A latency profile is missing, unreadable, or cannot be fitted."""


class LinearFit(BaseModel):
    """``y = intercept + slope·x``, fitted by least squares, with its goodness of fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intercept: float
    slope: float
    r2: float = Field(description="coefficient of determination on the fitted samples")
    n: int = Field(ge=2, description="samples fitted")

    def __call__(self, x: float) -> float:
        """The fitted value at ``x``."""
        return self.intercept + self.slope * x


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least squares of ``ys`` on ``xs`` with a non-negative intercept (closed form).

    Ordinary least squares: slope = cov(x, y) / var(x), intercept = mean(y) - slope·mean(x).
    A latency has no negative fixed cost, so when OLS puts the intercept below zero
    (timings that curve upwards, e.g. on a loaded machine) the line is refitted
    through the origin, the least-squares line with intercept 0: slope = Σxy / Σx².
    r2 = 1 - SS_residual / SS_total (1.0 when every y is equal and fitted exactly).
    """
    if len(xs) != len(ys):
        raise LatencyProfileError(f"{len(xs)} x values but {len(ys)} y values")
    if len(set(xs)) < 2:
        raise LatencyProfileError("a line needs samples at two or more distinct x values")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    if intercept < 0:
        intercept = 0.0
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    if not all(math.isfinite(v) for v in (slope, intercept, r2)):
        raise LatencyProfileError("the fit is not finite; check the samples")
    return LinearFit(intercept=intercept, slope=slope, r2=r2, n=n)


class EngineProfile(BaseModel):
    """The fitted latency of one real engine, and the samples behind the fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(description="the real engine measured, e.g. 'llama.cpp 0.3.36'")
    ttft: LinearFit = Field(description="seconds to first token vs uncached prompt tokens")
    tpot: LinearFit = Field(description="seconds per output token vs running batch size")
    max_batch: int = Field(ge=1, description="largest batch the sim may run at once")
    max_step_tokens: int = Field(
        ge=1, description="tokens one engine step may process (vLLM's max_num_batched_tokens)"
    )
    kv_bytes_per_token: int = Field(ge=1, description="KV cache bytes one token occupies")
    ttft_samples: list[tuple[int, float]] = Field(default_factory=list)
    tpot_samples: list[tuple[int, float]] = Field(default_factory=list)

    def ttft_s(self, uncached_prompt_tokens: int) -> float:
        """Modelled time to first token for a prompt with this many tokens to evaluate."""
        return max(_MIN_STEP_S, self.ttft(uncached_prompt_tokens))

    def tpot_s(self, batch: int) -> float:
        """Modelled duration of one decode step with ``batch`` running sequences."""
        return max(_MIN_STEP_S, self.tpot(max(1, batch)))

    @property
    def prefill_s_per_token(self) -> float:
        """What each prompt token evaluated adds to an engine step (the TTFT slope)."""
        return max(0.0, self.ttft.slope)

    @property
    def prefill_fixed_s(self) -> float:
        """What starting a prompt adds to its first step beyond a decode step at batch 1.

        With it, a lone prompt that fits one step takes ``tpot_s(1) + this + slope·L``,
        which is ``ttft_s(L)`` whenever the TTFT intercept is at least one decode step.
        """
        return max(0.0, self.ttft.intercept - self.tpot_s(1))

    @classmethod
    def fitted(
        cls,
        engine: str,
        ttft_samples: Sequence[tuple[int, float]],
        tpot_samples: Sequence[tuple[int, float]],
        *,
        max_batch: int,
        max_step_tokens: int,
        kv_bytes_per_token: int,
    ) -> EngineProfile:
        """Fit both lines to (x, seconds) samples of the real engine."""
        return cls(
            engine=engine,
            ttft=fit_line([x for x, _ in ttft_samples], [y for _, y in ttft_samples]),
            tpot=fit_line([x for x, _ in tpot_samples], [y for _, y in tpot_samples]),
            max_batch=max_batch,
            max_step_tokens=max_step_tokens,
            kv_bytes_per_token=kv_bytes_per_token,
            ttft_samples=list(ttft_samples),
            tpot_samples=list(tpot_samples),
        )


# PLACEHOLDERS, not measurements: ExampleConnector moves fp32 KV of the default model
# (46 KB a token) through files, ~1 GB/s write + read on a local disk -> ~50 us a token;
# NIXL over RDMA is far cheaper. Replace them from a calibration run (calibrated: true).
PLACEHOLDER_KV_TRANSFER_S_PER_TOKEN = 5e-5
PLACEHOLDER_KV_TRANSFER_FIXED_S = 2e-3


class DisaggregationProfile(BaseModel):
    """Timing of the prefill/decode split for the simulated engines (SIMULATED).

    ``prefill`` / ``decode``: the engine profile of a prefill-role and a decode-role
    worker (None: the monolithic cloud profile, the same engine on the same hardware).
    ``kv_transfer_*``: the hand-over of a prompt's KV from one to the other, paid by the
    decode worker before its request is scheduled (vLLM's decode requests wait for
    remote KV outside the running batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibrated: bool = Field(
        default=False, description="false: the values are placeholders, not a measurement"
    )
    source: str = Field(
        default="placeholder values (not measured): calibrate from a real prefill/decode run",
        description="where the values come from",
    )
    prefill: EngineProfile | None = Field(default=None, description="a prefill worker's engine")
    decode: EngineProfile | None = Field(default=None, description="a decode worker's engine")
    kv_transfer_s_per_token: float = Field(default=PLACEHOLDER_KV_TRANSFER_S_PER_TOKEN, ge=0)
    kv_transfer_fixed_s: float = Field(default=PLACEHOLDER_KV_TRANSFER_FIXED_S, ge=0)
    transfer_samples: list[tuple[int, float]] = Field(
        default_factory=list,
        description="(KV tokens moved, hand-over seconds) the transfer line was fitted to",
    )

    def transfer_s(self, tokens: int) -> float:
        """Modelled seconds to hand ``tokens`` tokens of KV from prefill to decode worker."""
        return (
            0.0 if tokens <= 0 else self.kv_transfer_fixed_s + self.kv_transfer_s_per_token * tokens
        )


class LatencyProfile(BaseModel):
    """The edge's and the cloud's engine profiles, with where and when they were measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = "SIMULATED ENGINE latency profile"
    machine: str = Field(description="the machine the real engines ran on")
    measured_at: str = Field(description="UTC date and time of the calibration run")
    command: str = Field(description="the command that measured it")
    load_average: str = Field(description="`uptime` load during the run: a shared machine")
    model: str = Field(description="the catalog model pair measured")
    edge: EngineProfile
    cloud: EngineProfile
    disaggregation: DisaggregationProfile = Field(default_factory=DisaggregationProfile)

    def cloud_for(self, role: str) -> EngineProfile:
        """The cloud engine profile of a worker in ``role`` (prefill, decode or both)."""
        split = self.disaggregation
        chosen = {"prefill": split.prefill, "decode": split.decode}.get(role)
        return chosen or self.cloud

    def save(self, path: Path) -> None:
        """Write the profile as indented JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path | None = None) -> LatencyProfile:
        """A profile from ``path``, or the default one shipped with Tandem."""
        try:
            if path is None:
                text = resources.files("models").joinpath("profiles", DEFAULT_PROFILE).read_text()
            else:
                text = path.read_text(encoding="utf-8")
            return cls.model_validate_json(text)
        except (OSError, ValueError) as exc:
            where = path or f"models/profiles/{DEFAULT_PROFILE}"
            raise LatencyProfileError(f"cannot read the latency profile {where}: {exc}") from exc

    @classmethod
    def default(cls) -> LatencyProfile:
        """The profile measured on the development machine, shipped in the package."""
        return cls.load(None)
