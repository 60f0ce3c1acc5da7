"""A device install: the built wheel, in a fresh virtual environment, serves the edge.

``pip install "tandem-mesh[edge]"`` from the wheel (not this checkout's editable
install) must give a working ``tandem edge install`` and ``tandem edge serve``: a
package-data file missing from the wheel (the unit templates, the chat template, the
classifier, the latency profile) fails here. pip takes llama.cpp from its wheel cache
(built once per machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from mesh.security import MeshDir
from mesh.server import free_port

ROOT = Path(__file__).resolve().parents[2]
_NOT_SOURCE = (".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench-results")


def _run(*argv: str | Path, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(900)
def test_the_wheel_installs_into_a_fresh_venv_and_serves_the_edge(tmp_path: Path) -> None:
    # From a copy: setuptools' build/ of an earlier run could carry deleted modules along.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", dist, ".", cwd=src)  # fmt: skip
    (wheel,) = dist.glob("tandem_mesh-*.whl")
    venv = tmp_path / "venv"
    _run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    _run(venv / "bin" / "pip", "install", "-q", f"{wheel}[edge]", cwd=tmp_path)
    # The edge extra pulls neither vLLM nor torch: a device does not carry them.
    missing = _run(venv / "bin" / "python", "-c",
                   "import importlib.util as u; print([m for m in ('vllm', 'torch')"
                   " if u.find_spec(m) is None])", cwd=tmp_path)  # fmt: skip
    assert missing.strip() == "['vllm', 'torch']"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TANDEM_HOME": str(tmp_path / "h")}

    # The device's units, from the templates the wheel carries (tandem/units/*.in), for
    # the bundle the hub's `tandem mesh add-edge` writes.
    hub = MeshDir(tmp_path / "hub")
    hub.init()
    hub.add("kitchen", "edge")
    prefix = tmp_path / "device"
    done = subprocess.run(
        [venv / "bin" / "tandem", "edge", "install", "--bundle", hub.bundle("kitchen"),
         "--prefix", prefix],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    units = prefix / "etc" / "systemd" / "system"
    edge_unit = (units / "tandem-edge.service").read_text()
    assert f"ExecStart={venv / 'bin' / 'tandem'} edge serve" in edge_unit
    assert "ProtectSystem=strict" in edge_unit
    assert "[Service]" in (units / "tandem-nats-leaf.service").read_text()
    assert "TANDEM_EDGE_NODE_ID=kitchen" in (prefix / "etc" / "tandem" / "edge.env").read_text()

    port = free_port()
    log = (tmp_path / "edge.log").open("w")
    edge = subprocess.Popen(
        [venv / "bin" / "tandem", "edge", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert edge.poll() is None, (tmp_path / "edge.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "edge.log").read_text()
            time.sleep(0.5)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["classifier"] is True  # the shipped classifier came with the wheel
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert answer.choices[0].message.content
        client.close()
    finally:
        edge.terminate()
        edge.wait(timeout=30)
        log.close()
