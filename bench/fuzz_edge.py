"""Fuzz the edge's HTTP API from its own ``/openapi.json`` (schemathesis), real llama.cpp.

For every operation the edge documents, schemathesis draws schema-valid bodies
(``positive``) and bodies that break the schema (``negative``: wrong types, missing
fields, values out of range), seeded, and each is sent to a running edge. Checked per
response:

- no 5xx, ever (``server_errors``: a 5xx is a handler that failed on its input);
- every 4xx is an OpenAI-style error body, ``{"error": {"message": str, "type": str}}``
  with a non-empty message (``bad_error_bodies``);
- throughout, a legitimate client streams chat answers beside the fuzzer and every one
  of them finishes with text (``legit_streams`` / ``legit_failures``);
- afterwards the daemon is alive and ``/health`` answers 200.

Generation is clamped (``max_tokens`` and its aliases to 8, ``n`` to 2) so that
thousands of valid requests fit in minutes on two cores: the fuzz targets the API's
parsing, validation and error paths, not decoding speed.

    python -m bench.fuzz_edge --per-operation 320 --out bench-results/fuzz   # ~5,000 requests
    python -m bench.fuzz_edge --per-operation 0 --stateful-scenarios 500     # stateful only
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.catalog import DEFAULT_PAIR

_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_MAX_TOKENS = 8
_MAX_N = 2


@dataclass
class FuzzReport:
    """What one fuzz run sent and what came back."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    bad_error_bodies: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: list[dict[str, Any]] = field(default_factory=list)
    # Schema-valid bodies the edge refused with a 4xx other than 404: the schema promises
    # more than the handlers accept (or a runtime limit, e.g. the context length).
    positive_refused: list[dict[str, Any]] = field(default_factory=list)
    # Stateful mode: a stored response that read back wrong (deleted yet found, created
    # yet missing, another id's body).
    state_errors: list[dict[str, Any]] = field(default_factory=list)
    scenarios: int = 0
    legit_streams: int = 0
    legit_failures: list[str] = field(default_factory=list)
    alive_after: bool = False
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view (the first few failures of each kind, in full)."""
        out = asdict(self)
        out["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        out["by_operation"] = dict(self.by_operation)
        for key in (
            "server_errors", "bad_error_bodies", "transport_errors", "positive_refused",
            "state_errors", "legit_failures",
        ):  # fmt: skip
            out[f"{key}_count"] = len(out[key])
            out[key] = out[key][:5]
        return out


def clamp(body: object, *, path: str, served_model: bool) -> object:
    """Keep a generated body's decoding short (see the module docstring): lengths drawn
    above 8 come down to 8 and an absent one is set (the edge's default is the rest of
    the context); a length drawn invalid (negative, a string) is left to be refused.
    ``served_model`` names the edge's model, so that schema-valid bodies reach the
    engine rather than stopping at "model not found"."""
    if not isinstance(body, dict):
        return body
    if served_model and "model" in body:
        body["model"] = DEFAULT_PAIR
    if all(body.get(key) is None for key in _LENGTH_FIELDS):
        body["max_output_tokens" if path == "/v1/responses" else "max_tokens"] = _MAX_TOKENS
    for key in _LENGTH_FIELDS:
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = min(body[key], _MAX_TOKENS)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
        body["n"] = min(body["n"], _MAX_N)
    return body


def is_openai_error(text: str) -> bool:
    """Whether ``text`` is OpenAI's error shape with a message a person can read."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"].strip())
        and isinstance(error.get("type"), str)
    )


def _legit_client(base_url: str, stop: threading.Event, report: FuzzReport) -> None:
    """A well-behaved agent streaming beside the fuzzer: every answer must finish."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    while not stop.is_set():
        try:
            stream = client.chat.completions.create(
                model=DEFAULT_PAIR, max_tokens=16, temperature=0, stream=True,
                messages=[{"role": "user", "content": "Name three colours."}],
            )  # fmt: skip
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            if not text or finish not in ("stop", "length"):
                report.legit_failures.append(f"finish {finish!r}, text {text!r}")
        except Exception as exc:  # any failure of a legitimate request counts
            report.legit_failures.append(f"{type(exc).__name__}: {exc}")
        report.legit_streams += 1
    client.close()


def fuzz_edge(base_url: str, *, per_operation: int, seed: int = 0) -> FuzzReport:
    """Fuzz the edge at ``base_url``: ``per_operation`` examples per operation and mode."""
    import schemathesis
    from schemathesis import GenerationMode

    report = FuzzReport()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    stop = threading.Event()
    legit = threading.Thread(target=_legit_client, args=(base_url, stop, report), daemon=True)
    started = time.monotonic()
    legit.start()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_one(report, base_url, operation, mode, per_operation, seed)
    finally:
        _conclude(report, base_url, stop, legit, started)
    return report


def _conclude(
    report: FuzzReport,
    base_url: str,
    stop: threading.Event,
    legit: threading.Thread,
    started: float,
) -> None:
    """Stop the legitimate client; record whether the edge still answers, and the time."""
    import httpx

    stop.set()
    legit.join(120)
    try:
        report.alive_after = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        report.alive_after = False
    report.seconds = time.monotonic() - started


def fuzz_stateful(base_url: str, *, scenarios: int, steps: int = 8) -> FuzzReport:
    """Schemathesis's stateful mode: sequences of calls that follow the schema's links
    (a response created, then read, deleted, read again), ``scenarios`` of up to ``steps``
    calls, derandomized. Besides the per-response checks of ``fuzz_edge``, every read of
    a stored response must agree with what the sequence did to it: 200 with the same id
    once created (and stored), 404 once deleted."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings

    report = FuzzReport()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    created: set[str] = set()
    deleted: set[str] = set()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            report.scenarios += 1

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "timeout": 60}

        def before_call(self, case: Any) -> None:
            if getattr(case, "body", None) is not None:
                case.body = clamp(case.body, path=case.operation.path, served_model=True)

        def validate_response(self, response: Any, case: Any, *_: Any, **__: Any) -> None:
            method, path = case.method.upper(), case.operation.path
            name = f"{method} {path} stateful"
            _record(report, name, case, response.status_code, response.text)
            if path == "/v1/responses" and method == "POST" and response.status_code == 200:
                body = case.body if isinstance(case.body, dict) else {}
                kind = response.headers.get("content-type") or ""  # a list in schemathesis 4
                kind = " ".join(kind) if isinstance(kind, list) else kind
                if "json" in kind and body.get("store") is not False:  # stored by default
                    created.add(response.json()["id"])
                return
            if path != "/v1/responses/{response_id}":
                return
            rid = str(case.path_parameters.get("response_id"))
            if method == "DELETE" and response.status_code == 200:
                deleted.add(rid)
            elif method == "GET":
                expected = 404 if rid in deleted else 200 if rid in created else None
                if expected is not None:
                    report.by_operation["stateful: reads checked"] += 1
                got_id = response.json().get("id") if response.status_code == 200 else None
                if (expected is not None and response.status_code != expected) or (
                    got_id is not None and got_id != rid
                ):
                    report.state_errors.append(
                        {"id": rid, "expected": expected, "status": response.status_code,
                         "got_id": got_id}
                    )  # fmt: skip

    stop = threading.Event()
    legit = threading.Thread(target=_legit_client, args=(base_url, stop, report), daemon=True)
    started = time.monotonic()
    legit.start()
    try:
        Workflow.run(
            settings=settings(
                max_examples=scenarios, stateful_step_count=steps, deadline=None,
                database=None, derandomize=True, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
        )  # fmt: skip
    except (requests.RequestException, OSError) as exc:  # refused, reset, timed out
        report.transport_errors.append({"op": "stateful", "error": repr(exc)})
    finally:
        _conclude(report, base_url, stop, legit, started)
    report.by_operation["stateful: responses created"] = len(created)
    report.by_operation["stateful: responses deleted"] = len(deleted)
    return report


def _fuzz_one(
    report: FuzzReport, base_url: str, operation: Any, mode: Any, examples: int, seed: int
) -> None:
    """``examples`` cases of one operation in one generation mode, each sent and recorded."""
    import requests  # schemathesis's transport
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable

    name = f"{operation.method.upper()} {operation.path} {mode.value}"

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples, deadline=None, database=None,
        phases=[Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        if hasattr(case, "body"):
            case.body = clamp(case.body, path=operation.path, served_model=mode.value == "positive")
        try:
            response = case.call(base_url=base_url, timeout=60)
        except (requests.RequestException, OSError) as exc:  # refused, reset, timed out
            body = repr(getattr(case, "body", None))[:2000]
            report.transport_errors.append({"op": name, "error": repr(exc), "body": body})
            return
        _record(report, name, case, response.status_code, response.text)

    try:
        send()
    except Unsatisfiable:  # nothing to break (GET /health has no parameters to get wrong)
        report.by_operation.setdefault(name, 0)


def _record(report: FuzzReport, name: str, case: Any, status: int, text: str) -> None:
    report.requests += 1
    report.by_status[status] += 1
    report.by_operation[name] += 1
    seen = {"op": name, "status": status, "body": repr(getattr(case, "body", None))[:400],
            "response": text[:400]}  # fmt: skip
    if status >= 500:
        report.server_errors.append(seen)
    elif status >= 400 and not is_openai_error(text):
        report.bad_error_bodies.append(seen)
    if 400 <= status < 500 and status != 404 and name.endswith("positive"):
        report.positive_refused.append(seen)


def main() -> None:
    from tandem.local import EdgeProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--per-operation", type=int, default=320, help="examples per operation+mode")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument(
        "--stateful-scenarios", type=int, default=0,
        help="also run schemathesis's stateful mode: this many call sequences",
    )  # fmt: skip
    p.add_argument("--out", default="bench-results/fuzz")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with EdgeProcess(slots=1, max_queue=64) as edge:
        report = (
            fuzz_edge(edge.base_url, per_operation=args.per_operation, seed=args.seed)
            if args.per_operation
            else FuzzReport()  # --per-operation 0: the stateful mode only
        )
        stateful = None
        if args.stateful_scenarios:
            stateful = fuzz_stateful(edge.base_url, scenarios=args.stateful_scenarios).summary()
        alive = edge.alive
    summary = {
        **report.summary(),
        "stateful": stateful,
        "edge_process_alive": alive,
        "args": vars(args),
    }
    (out / "fuzz_edge.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
