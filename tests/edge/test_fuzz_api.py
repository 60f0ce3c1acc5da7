"""The quick tier of the edge's API fuzz (``bench/fuzz_edge.py``; the full tier is
``python -m bench.fuzz_edge``, its figures in docs/reliability.md): schema-valid and
schema-breaking bodies for every operation in ``/openapi.json``, against a real edge."""

from __future__ import annotations

import pytest

from bench.fuzz_edge import fuzz_edge, fuzz_stateful
from tandem.local import EdgeProcess

pytestmark = pytest.mark.timeout(300)


def test_fuzzed_requests_get_4xx_openai_errors_never_5xx_and_a_stream_runs_undisturbed(
    edge: EdgeProcess,
) -> None:
    report = fuzz_edge(edge.base_url, per_operation=12, seed=3)
    assert report.requests >= 80, report.by_operation
    # Both kinds of body reached each POST operation, and some were served.
    assert all(report.by_operation[f"POST {path} {mode}"] > 0
               for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses")
               for mode in ("positive", "negative"))  # fmt: skip
    assert (
        report.by_status[200] > 10
        and sum(n for status, n in report.by_status.items() if 400 <= status < 500) > 40
    )
    assert report.server_errors == []
    assert report.bad_error_bodies == []
    assert report.transport_errors == []
    assert report.legit_streams >= 1 and report.legit_failures == []
    assert report.alive_after and edge.alive


def test_stateful_sequences_read_back_what_they_stored(edge: EdgeProcess) -> None:
    """Schemathesis's stateful mode over the schema's links: responses created, read,
    deleted and read again; every read agrees with the sequence, and no 5xx."""
    report = fuzz_stateful(edge.base_url, scenarios=8, steps=6)
    assert report.scenarios >= 8
    assert report.by_operation["stateful: responses created"] >= 1, report.by_operation
    assert report.by_operation["stateful: reads checked"] >= 1, report.by_operation
    assert report.state_errors == []
    assert report.server_errors == [] and report.bad_error_bodies == []
    assert report.transport_errors == []
    assert report.alive_after and edge.alive
