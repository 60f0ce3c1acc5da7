"""What a worker's settings hand vLLM: its ``AsyncEngineArgs`` (no engine starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.engine import VllmEngine
from cloud.settings import CloudSettings


def test_enforce_eager_is_off_by_default_and_reaches_vllm_when_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM's own default (torch.compile) unless the operator asks, by the environment
    as a pod or unit sets it (``tandem cloud serve --enforce-eager`` sets the same)."""
    monkeypatch.delenv("TANDEM_CLOUD_ENFORCE_EAGER", raising=False)
    default = VllmEngine(CloudSettings()).engine_args(Path("/weights"), None)
    assert default.enforce_eager is False
    monkeypatch.setenv("TANDEM_CLOUD_ENFORCE_EAGER", "true")
    eager = VllmEngine(CloudSettings()).engine_args(Path("/weights"), None)
    assert eager.enforce_eager is True
    assert eager.model == "/weights" and eager.enable_prefix_caching is True
