"""The simulated cloud worker must run where vLLM and torch are not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_sim_worker_path_imports_neither_vllm_nor_torch() -> None:
    code = (
        "import sys\n"
        "import cloud.service, cloud.sim_engine, cloud.worker\n"
        "heavy = sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=50
    )
    assert out.stdout.strip() == ""
