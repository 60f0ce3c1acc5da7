"""Malformed mesh messages are counted by kind and logged once per interval, not each."""

from __future__ import annotations

import logging

import pytest

from mesh.bad_messages import BadMessages


def test_the_first_of_a_kind_is_logged_then_only_a_count_each_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    bad = BadMessages(interval_s=60.0, clock=lambda: now[0])
    log = logging.getLogger("test.bad")
    with caplog.at_level(logging.WARNING, logger="test.bad"):
        for _ in range(500):
            bad.note("GenerateRequest", "tandem.v1.x", "not JSON", log)
        bad.note("CancelRequest", "tandem.v1.y", "no request_id", log)
        now[0] = 61.0
        bad.note("GenerateRequest", "tandem.v1.x", "not JSON", log)
    lines = [r.getMessage() for r in caplog.records]
    assert bad.counts == {"GenerateRequest": 501, "CancelRequest": 1}
    assert len(lines) == 3, lines  # one per kind, then one a minute later
    assert "malformed GenerateRequest message on tandem.v1.x: not JSON" in lines[0]
    assert "(500 of them since the last report)" in lines[2]
