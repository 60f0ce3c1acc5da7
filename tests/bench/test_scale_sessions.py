"""The scale run's sessions start at the steady call rate (renewal maths, seeded)."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _scale_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "scale_bench.py"
    spec = importlib.util.spec_from_file_location("scale_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("median_s, sigma", [(60.0, 1.0), (300.0, 0.5)])
def test_first_calls_come_at_the_steady_rate(median_s: float, sigma: float) -> None:
    scale = _scale_bench()
    session = scale.Session(
        id="s",
        edge_url="http://unused",
        rng=random.Random(7),
        gap_median_s=median_s,
        gap_sigma=sigma,
        tool_share=0.9,
        stream_share=0.3,
    )
    n = 100_000
    waits = [session.time_left_s() for _ in range(n)]
    mean_gap = median_s * math.exp(sigma**2 / 2)
    # In a steady state a share window / mean_gap of the sessions call within a short
    # window; a uniform share of a plain gap would give up to e^(sigma^2) times more.
    for window in (0.05 * median_s, 0.2 * median_s):
        share = sum(w < window for w in waits) / n
        assert share == pytest.approx(window / mean_gap, rel=0.06)
    # The time left has the stationary mean E[G^2] / (2 E[G]).
    assert sum(waits) / n == pytest.approx(mean_gap * math.exp(sigma**2) / 2, rel=0.05)
