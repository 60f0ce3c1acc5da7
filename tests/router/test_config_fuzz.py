"""Fuzzed policy and configuration (hypothesis, seeded): whatever an operator writes,
``RoutingPolicy.from_yaml`` and ``PlannerConfig.from_yaml`` return a valid object or
raise their own error with a message, and the settings classes raise pydantic's
``ValidationError``: never another exception (a traceback at ``tandem policy set``, a
follower that fails on a stored revision). The counts and findings are in
docs/reliability.md."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cloud.planner_config import PlannerConfig, PlannerConfigError
from cloud.settings import CloudSettings
from edge.settings import EdgeSettings
from router.errors import PolicyError
from router.policy import RoutingPolicy

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

VALID_POLICY = """\
rules:
  - name: tools-go-to-the-cloud
    when: {has_tools: true}
    route: cloud
  - name: short-prompts-stay
    when: {prompt_tokens_below: 400}
    route: edge
default: {route: speculative}
slo: {ttft_p95_ms: 850, itl_p95_ms: 120}
"""

# YAML-shaped values: scalars of every kind YAML has, nested in lists and mappings.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
# Words the policy knows, so that drawn mappings get past the first level more often.
policy_words = st.sampled_from(
    ["rules", "default", "slo", "budgets", "fallbacks", "escalation", "route", "when",
     "name", "has_tools", "prompt_tokens_below", "ttft_p95_ms", "itl_p95_ms", "edge",
     "cloud", "speculative", "tenant", "cloud_tokens_per_hour"]
)  # fmt: skip
policy_like = st.recursive(
    scalars | policy_words,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(policy_words, inner, max_size=5),
    max_leaves=30,
)


def _mutations(text: str) -> st.SearchStrategy[str]:
    """``text`` with a slice cut out, a slice repeated, or a character replaced."""
    n = len(text)
    cut = st.tuples(st.integers(0, n), st.integers(0, n)).map(
        lambda ij: text[: min(ij)] + text[max(ij) :]
    )
    repeat = st.tuples(st.integers(0, n), st.integers(0, n)).map(
        lambda ij: text[: max(ij)] + text[min(ij) : max(ij)] + text[max(ij) :]
    )
    replace = st.tuples(st.integers(0, n - 1), st.characters()).map(
        lambda ic: text[: ic[0]] + ic[1] + text[ic[0] + 1 :]
    )
    return cut | repeat | replace


def _policy_outcome(text: str) -> RoutingPolicy | None:
    try:
        policy = RoutingPolicy.from_yaml(text)
    except PolicyError as exc:
        assert str(exc).strip(), "an empty error message"
        return None
    assert RoutingPolicy.from_yaml(policy.to_yaml()) == policy  # what is shown round-trips
    return policy


@seed(1)
@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    _policy_outcome(text)


@seed(2)
@FUZZ
@given(document=documents | policy_like)
def test_any_yaml_document_is_a_policy_or_a_policy_error(document: Any) -> None:
    _policy_outcome(yaml.safe_dump(document))


@seed(3)
@FUZZ
@given(text=_mutations(VALID_POLICY))
def test_a_damaged_policy_is_refused_with_a_message_or_still_valid(text: str) -> None:
    _policy_outcome(text)


@pytest.mark.parametrize(
    "text",
    ["[" * 5000, "{a: " * 3000, "- " * 3000 + "1", "rules: " + "[" * 2000 + "]" * 2000],
    ids=["flow-lists", "flow-maps", "block-lists", "rules-nested"],
)
def test_a_deeply_nested_document_is_refused_not_a_recursion_error(text: str) -> None:
    """Found by this fuzz: PyYAML recurses per nesting level, so a few thousand opening
    brackets raised RecursionError from ``tandem policy set`` and the planner config."""
    with pytest.raises(PolicyError, match="nested"):
        RoutingPolicy.from_yaml(text)
    with pytest.raises(PlannerConfigError, match="nested"):
        PlannerConfig.from_yaml(text)


@seed(4)
@FUZZ
@given(document=documents | policy_like)
def test_any_planner_config_is_valid_or_a_planner_config_error(document: Any) -> None:
    try:
        config = PlannerConfig.from_yaml(yaml.safe_dump(document))
    except PlannerConfigError as exc:
        assert str(exc).strip()
        return
    assert PlannerConfig.from_yaml(config.to_yaml()) == config


setting_values = st.dictionaries(st.sampled_from(
    sorted(set(EdgeSettings.model_fields) | set(CloudSettings.model_fields))
), scalars | st.lists(scalars, max_size=3), max_size=6)  # fmt: skip


@seed(5)
@FUZZ
@given(values=setting_values)
def test_settings_refuse_bad_values_with_a_validation_error(values: dict[str, Any]) -> None:
    for cls in (EdgeSettings, CloudSettings):
        known = {k: v for k, v in values.items() if k in cls.model_fields}
        try:
            cls.model_validate(known)
        except ValidationError as exc:
            assert exc.errors()  # each names its field


def test_the_cli_refuses_a_deeply_nested_policy_with_a_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "policy.yaml"
    bad.write_text("[" * 5000)
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", "validate", "-f", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "nested" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
