"""The live policy end to end: the `tandem policy` CLI, real NATS KV, and a real edge daemon
that applies each revision without dropping requests (and refuses invalid ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh import subjects
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

pytestmark = pytest.mark.slow

LOCAL = """# everything stays on this edge
rules:
  - name: everything-local
    when: {}
    route: edge
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(store_dir=tmp_path_factory.mktemp("js")) as server:
        yield server


@pytest.fixture(scope="module")
def edge(mesh: EmbeddedNats) -> Iterator[EdgeProcess]:
    with EdgeProcess(nats_url=mesh.url, node_id="edge-live", heartbeat_s=0.5) as e:
        yield e


def policy_cli(
    mesh: EmbeddedNats, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_NATS_URL": mesh.url}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"policy {args} failed ({done.returncode}):\n{done.stderr}")
    return done


def health(edge: EdgeProcess) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{edge.base_url}/health", timeout=5).json()
    return result


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def ask(edge: EdgeProcess, **extra: Any) -> Any:
    return edge.client().chat.completions.create(
        model=DEFAULT_PAIR,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        **extra,
    )


def test_set_applies_on_the_edge_without_dropping_a_request(
    mesh: EmbeddedNats, edge: EdgeProcess, tmp_path: Path
) -> None:
    assert ask(edge).usage.tandem["rule"] == "default"
    # A long answer streams while the policy changes under it.
    outcome: dict[str, Any] = {}

    def stream() -> None:
        chunks = edge.client().chat.completions.create(
            model=DEFAULT_PAIR,
            messages=[{"role": "user", "content": "Tell a long story about a ship."}],
            max_tokens=96,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome["finish"] = chunk.choices[0].finish_reason
            if chunk.usage:
                outcome["rule"] = (chunk.usage.model_extra or {})["tandem"]["rule"]

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.5)
    path = tmp_path / "local.yaml"
    path.write_text(LOCAL)
    done = policy_cli(mesh, "set", "-f", str(path), "-m", "keep it local")
    assert "edge-live: applied" in done.stdout, done.stdout
    streamer.join(timeout=120)
    assert outcome == {"finish": "length", "rule": "default"}  # finished under its policy
    assert health(edge)["policy"]["source"] == "store"
    assert ask(edge).usage.tandem["rule"] == "everything-local"
    assert policy_cli(mesh, "get").stdout == LOCAL  # as written, comment included


def test_an_invalid_stored_policy_is_never_applied(mesh: EmbeddedNats, edge: EdgeProcess) -> None:
    before = health(edge)["policy"]["revision"]
    bad = json.dumps({"yaml": "rules: [{name: x, route: moon}]"})
    subprocess.run(  # around the CLI, as a raw KV write could
        [sys.executable, "-c", _RAW_PUT, mesh.url, bad], check=True, timeout=30
    )
    wait_for(lambda: health(edge)["policy"]["rejected"] is not None)
    status = health(edge)["policy"]
    assert status["revision"] == before
    assert "rules.0.route" in status["rejected"]["error"]
    assert edge.metrics()["tandem_edge_policy_rejections_total"] == 1
    assert ask(edge).usage.tandem["rule"] == "everything-local"
    shown = policy_cli(mesh, "show").stdout
    assert "INVALID" in shown


def test_cli_history_diff_rollback_and_conflict(
    mesh: EmbeddedNats, edge: EdgeProcess, tmp_path: Path
) -> None:
    history = json.loads(policy_cli(mesh, "history", "-o", "json").stdout)
    assert [h["valid"] for h in history] == [True, False]  # the raw invalid write is listed
    assert history[0]["message"] == "keep it local"
    first = history[0]["revision"]
    cloudy = tmp_path / "cloudy.yaml"
    cloudy.write_text("default: {route: cloud}\nrules: []\n")
    diff = policy_cli(mesh, "diff", "-f", str(cloudy)).stdout  # vs the stored (invalid) one
    assert "-rules: [{name: x, route: moon}]\n+default: {route: cloud}\n" in diff
    # A stale --if-revision is a conflict: exit 3, nothing written.
    stale = policy_cli(mesh, "set", "-f", str(cloudy), "--if-revision", str(first), check=False)
    assert stale.returncode == 3 and "changed since revision" in stale.stderr
    rolled = policy_cli(mesh, "rollback", str(first)).stdout
    assert "applied" in rolled
    wait_for(lambda: health(edge)["policy"]["revision"] > history[-1]["revision"])
    assert ask(edge).usage.tandem["rule"] == "everything-local"


def test_validate_and_explain(mesh: EmbeddedNats, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: a, route: edge, when: {prompt_tokens_below: -3}}\n")
    done = policy_cli(mesh, "validate", "-f", str(bad), check=False)
    assert done.returncode == 2 and "rules.0.when.prompt_tokens_below" in done.stderr
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "model": DEFAULT_PAIR,
                "messages": [{"role": "user", "content": "What is the weather?"}],
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "weather", "parameters": {"type": "object"}},
                    }
                ],
            }
        )
    )
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "rules:\n"
        "  - {name: huge, when: {prompt_tokens_at_least: 5000}, route: cloud}\n"
        "  - {name: tools, when: {has_tools: true}, route: speculative, max_draft_tokens: 4}\n"
    )
    out = policy_cli(mesh, "explain", str(request), "-f", str(policy)).stdout
    assert "skip  huge -- prompt_tokens_at_least: 5000 (request: " in out
    assert "MATCH tools" in out
    assert "route: speculative (rule tools" in out and "max_draft_tokens=4" in out


_RAW_PUT = f"""
import asyncio, sys
from mesh.connection import connect
async def main():
    nc = await connect(sys.argv[1], name="raw")
    kv = await nc.jetstream().key_value({subjects.POLICY_BUCKET!r})
    await kv.put({subjects.POLICY_KEY!r}, sys.argv[2].encode())
    await nc.close()
asyncio.run(main())
"""


def test_complexity_rules_use_the_shipped_classifier(
    mesh: EmbeddedNats, edge: EdgeProcess, tmp_path: Path
) -> None:
    assert health(edge)["classifier"] is True
    path = tmp_path / "complexity.yaml"
    # Any score is >= 0 and < 1.01: the first rule fires iff the classifier scored it.
    path.write_text(
        "rules:\n"
        "  - {name: scored, when: {complexity_at_least: 0.0, complexity_below: 1.0}, route: edge}\n"
    )
    policy_cli(mesh, "set", "-f", str(path))
    assert ask(edge).usage.tandem["rule"] == "scored"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
    out = policy_cli(mesh, "explain", str(request)).stdout
    assert "complexity=0." in out and "MATCH scored" in out


def test_edit_reopens_on_errors_then_saves(mesh: EmbeddedNats, tmp_path: Path) -> None:
    # A scripted $EDITOR: the first save is invalid, the second (seeing the errors on
    # top, as a person would) is valid.
    script = tmp_path / "editor.py"
    script.write_text(
        "import pathlib, sys\n"
        f"count = pathlib.Path({str(tmp_path / 'count')!r})\n"
        "n = int(count.read_text()) if count.exists() else 0\n"
        "count.write_text(str(n + 1))\n"
        "path = pathlib.Path(sys.argv[1])\n"
        "text = path.read_text()\n"
        "if n == 0:\n"
        "    path.write_text('rules: [{name: edited, route: nowhere}]\\n')\n"
        "else:\n"
        "    assert '#! invalid policy' in text and 'rules.0.route' in text, text\n"
        "    path.write_text('# edited\\nrules: [{name: edited, route: edge}]\\n')\n"
    )
    env = {**os.environ, "TANDEM_NATS_URL": mesh.url, "EDITOR": f"{sys.executable} {script}"}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "policy", "edit"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rules.0.route" in done.stderr  # the first attempt's error was shown
    assert (tmp_path / "count").read_text() == "2"
    assert policy_cli(mesh, "get").stdout == "# edited\nrules: [{name: edited, route: edge}]\n"
