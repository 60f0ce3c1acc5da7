"""``tandem policy``: read, edit and explain the live routing policy in NATS KV.

Examples::

    tandem policy show
    tandem policy get -o yaml > policy.yaml
    tandem policy validate -f policy.yaml
    tandem policy set -f policy.yaml -m "tools to speculative"
    tandem policy edit                     # $EDITOR, validated before it is saved
    tandem policy diff -f policy.yaml      # stored vs file; or --from 3 --to 5
    tandem policy history
    tandem policy rollback 3
    tandem policy explain request.json     # which rule fires, and why the others did not

Every write is a compare-and-set on the revision you read: if someone changed the
policy meanwhile, nothing is written, you are told who did, and your version is
kept in a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mesh.connection import DEFAULT_NATS_URL
from router.errors import (
    InvalidRevisionError,
    PolicyConflictError,
    PolicyError,
    PolicyStoreError,
    RevisionNotFoundError,
)
from router.policy import RequestFeatures, RoutingPolicy, explain
from tandem.commands.common import NatsCredsOption, NatsTlsCaOption, fail, on_mesh

app = typer.Typer(help="Show, edit, roll back and explain the live routing policy.")
# The operator identity every subcommand connects with (set by the group's options).
_IDENTITY: dict[str, Path | None] = {"creds": None, "tls_ca": None}


@app.callback()
def _identity(nats_creds: NatsCredsOption = None, nats_tls_ca: NatsTlsCaOption = None) -> None:
    """Show, edit, roll back and explain the live routing policy."""
    _IDENTITY.update(creds=nats_creds, tls_ca=nats_tls_ca)


T = TypeVar("T")

NatsUrl = Annotated[str, typer.Option(help="NATS URL of the mesh.", envvar="TANDEM_NATS_URL")]
_APPLIED_WAIT_S = 2.0


def _run(nats_url: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """Connect, open the store, run ``work(store)``, close; one clear line on failure."""
    from router.store import PolicyStore

    async def with_store(nc: Any) -> T:
        return await work(await PolicyStore.open(nc))

    try:
        return on_mesh(nats_url, "tandem-policy", _IDENTITY["creds"], _IDENTITY["tls_ca"],
                       with_store)  # fmt: skip
    except PolicyConflictError as exc:
        fail(str(exc), code=3)
    except PolicyStoreError as exc:
        fail(str(exc))
    except PolicyError as exc:
        fail(f"the policy is invalid; nothing was written:\n{exc}", code=2)


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


# -- reading --------------------------------------------------------------------


@app.command()
def show(nats_url: NatsUrl = DEFAULT_NATS_URL) -> None:
    """The stored policy at a glance: revision, author, rules in order."""

    async def work(store: Any) -> Any:
        return await store.current()

    stored = _run(nats_url, work)
    console = Console()
    if stored is None:
        console.print("no policy stored: edges use their file or built-in policy, which is:")
        policy = RoutingPolicy()
    else:
        when = stored.written_at.strftime("%Y-%m-%d %H:%M:%S UTC") if stored.written_at else "?"
        console.print(f"revision {stored.revision} by {stored.author or '?'} at {when}")
        if stored.message:
            console.print(f"  {stored.message}")
        if stored.policy is None:
            console.print(f"[red]INVALID (edges keep their last good policy):[/red] {stored.error}")
            return
        policy = stored.policy
    table = Table()
    for column in ("#", "rule", "when", "route"):
        table.add_column(column)
    for i, rule in enumerate(policy.rules, 1):
        conditions = rule.when.model_dump(exclude_none=True)
        when_text = ", ".join(f"{k}={v}" for k, v in conditions.items()) or "always"
        route = rule.route + (f" (k<={rule.max_draft_tokens})" if rule.max_draft_tokens else "")
        table.add_row(str(i), rule.name, when_text, route)
    table.add_row("", "default", "no rule matched", policy.default.route)
    console.print(table)
    f = policy.fallbacks
    overload = (
        "off"
        if f.edge_overloaded is None
        else f"queue >= {f.edge_overloaded.queue_at_least} -> {f.edge_overloaded.route}"
    )
    console.print(f"cloud unavailable: {f.cloud_unavailable}; edge overloaded: {overload}")
    e = policy.escalation
    console.print(
        f"escalation: {'on' if e.enabled else 'off'}"
        + (
            f" (mean logprob over {e.window_tokens} tokens < {e.min_mean_logprob} -> {e.route})"
            if e.enabled
            else ""
        )
    )
    for b in policy.budgets:
        console.print(
            f"budget: tenant {b.tenant}: {b.cloud_tokens_per_hour} cloud tokens/h, "
            f"then {b.over_budget}"
        )


@app.command()
def get(
    output: Annotated[
        Literal["yaml", "json"], typer.Option("-o", "--output", help="yaml (as written) or json.")
    ] = "yaml",
    revision: Annotated[int | None, typer.Option(help="A past revision.")] = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Print the stored policy (YAML exactly as it was written, comments included)."""

    async def work(store: Any) -> Any:
        return await (store.current() if revision is None else store.at(revision))

    stored = _run(nats_url, work)
    if stored is None:
        text = RoutingPolicy().to_yaml()
        typer.echo("# no policy stored; this is the built-in default", err=True)
    else:
        text = stored.yaml_text
    if output == "json":
        policy = stored.policy if stored is not None else RoutingPolicy()
        if policy is None:
            fail(f"revision {stored.revision} is invalid: {stored.error}")
        text = policy.model_dump_json(indent=2) + "\n"
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command()
def history(
    output: Annotated[
        Literal["table", "json"], typer.Option("-o", "--output", help="table or json.")
    ] = "table",
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Every stored revision still held (the bucket keeps the last 64)."""
    from router.store import describe

    async def work(store: Any) -> Any:
        return await store.history()

    revisions = _run(nats_url, work)
    if output == "json":
        typer.echo(json.dumps([describe(s) for s in revisions], indent=2))
        return
    if not revisions:
        typer.echo("no policy stored yet")
        return
    table = Table()
    for column in ("revision", "written", "author", "valid", "message"):
        table.add_column(column)
    for s in revisions:
        table.add_row(
            str(s.revision),
            s.written_at.strftime("%Y-%m-%d %H:%M:%S") if s.written_at else "?",
            s.author,
            "yes" if s.policy is not None else "NO",
            s.message,
        )
    Console().print(table)


@app.command()
def diff(
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="Compare the stored policy to this file.")
    ] = None,
    from_revision: Annotated[int | None, typer.Option("--from", help="Older revision.")] = None,
    to_revision: Annotated[int | None, typer.Option("--to", help="Newer revision.")] = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """A unified diff: stored vs file, two revisions, or the latest change (the default)."""
    local = _read_file(file) if file else None

    async def work(store: Any) -> tuple[str, str, str, str]:
        if local is not None:
            current = await store.current()
            name = f"revision {current.revision}" if current else "(nothing stored)"
            return (current.yaml_text if current else "", local, name, str(file))
        if from_revision is not None:
            old = await store.at(from_revision)
            new = await store.at(to_revision) if to_revision else await store.current()
            return (old.yaml_text, new.yaml_text, f"revision {old.revision}",
                    f"revision {new.revision}")  # fmt: skip
        revisions = await store.history()
        if len(revisions) < 2:
            raise RevisionNotFoundError("fewer than two revisions are stored; nothing to compare")
        a, b = revisions[-2], revisions[-1]
        return (a.yaml_text, b.yaml_text, f"revision {a.revision}", f"revision {b.revision}")

    old, new, old_name, new_name = _run(nats_url, work)

    def as_lines(text: str) -> list[str]:
        return (text if text.endswith("\n") or not text else text + "\n").splitlines(True)

    lines = difflib.unified_diff(as_lines(old), as_lines(new), old_name, new_name)
    text = "".join(lines)
    typer.echo(text if text else "no differences", nl=not text)


# -- writing --------------------------------------------------------------------


@app.command()
def validate(
    file: Annotated[Path, typer.Option("-f", "--file", help="Policy YAML to check.")],
) -> None:
    """Check a policy file offline; every problem is printed with its field path."""
    try:
        policy = RoutingPolicy.from_yaml(_read_file(file))
    except PolicyError as exc:
        fail(f"{file} is invalid:\n{exc}", code=2)
    typer.echo(f"{file}: valid ({len(policy.rules)} rules, default route {policy.default.route})")


def _write(
    nats_url: str,
    yaml_text: str,
    *,
    message: str,
    expect_revision: int | None,
    wait_s: float,
) -> None:
    """CAS-write and report which edges applied the new revision."""
    from mesh import subjects
    from mesh.errors import ProtocolError
    from mesh.protocol import PolicyApplied

    async def work(store: Any) -> tuple[int, list[PolicyApplied], float]:
        expect = expect_revision
        if expect is None:
            current = await store.current()
            expect = current.revision if current else 0
        reports: list[PolicyApplied] = []
        arrived = asyncio.Event()

        async def collect(msg: Any) -> None:
            with contextlib.suppress(ProtocolError):
                reports.append(PolicyApplied.from_bytes(msg.data))
                arrived.set()

        nc = store.nc  # listen before writing, so no report is missed
        sub = await nc.subscribe(subjects.policy_applied(), cb=collect)
        started = time.perf_counter()
        revision = await store.set(yaml_text, expect_revision=expect, message=message)
        edges = await _edges_on_mesh(nc)
        deadline = started + wait_s
        while (left := deadline - time.perf_counter()) > 0 and (
            len({r.node_id for r in reports if r.revision == revision}) < max(1, len(edges))
        ):
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), left)
        await sub.unsubscribe()
        return revision, [r for r in reports if r.revision == revision], started

    revision, reports, _ = _run(nats_url, work)
    typer.echo(f"policy stored as revision {revision}")
    for r in reports:
        verdict = "applied" if r.applied else f"REFUSED: {r.error}"
        typer.echo(f"  {r.node_id}: {verdict}")
    if not reports:
        typer.echo(f"  no edge reported within {wait_s:.1f} s (edges pick it up when they connect)")


async def _edges_on_mesh(nc: Any) -> list[str]:
    """Edges heard in one heartbeat interval (to know how many reports to wait for)."""
    from mesh import subjects
    from mesh.errors import ProtocolError
    from mesh.protocol import NodeHeartbeat

    seen: set[str] = set()

    async def on_beat(msg: Any) -> None:
        try:
            beat = NodeHeartbeat.from_bytes(msg.data)
        except ProtocolError:
            return
        if beat.role == "edge":
            seen.add(beat.node_id)

    sub = await nc.subscribe(subjects.all_node_loads(), cb=on_beat)
    await asyncio.sleep(1.1)
    await sub.unsubscribe()
    return sorted(seen)


@app.command(name="set")
def set_policy(
    file: Annotated[Path, typer.Option("-f", "--file", help="Policy YAML to store.")],
    message: Annotated[str, typer.Option("-m", "--message", help="Why (kept in history).")] = "",
    if_revision: Annotated[
        int | None,
        typer.Option(help="Write only if the stored revision is still this (0: none stored)."),
    ] = None,
    wait_s: Annotated[float, typer.Option(help="Seconds to wait for edges to apply it.")] = (
        _APPLIED_WAIT_S
    ),
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Validate and store a policy; edges apply it within milliseconds."""
    text = _read_file(file)
    try:
        RoutingPolicy.from_yaml(text)
    except PolicyError as exc:
        fail(f"{file} is invalid; nothing was written:\n{exc}", code=2)
    _write(nats_url, text, message=message, expect_revision=if_revision, wait_s=wait_s)


@app.command()
def rollback(
    revision: Annotated[int, typer.Argument(help="The revision to bring back.")],
    message: Annotated[str, typer.Option("-m", "--message")] = "",
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Store an old revision's policy again, as a new revision (history is never rewritten)."""

    async def work(store: Any) -> tuple[str, int]:
        old = await store.at(revision)
        current = await store.current()
        if old.policy is None:
            raise InvalidRevisionError(f"revision {revision} is invalid; it cannot be brought back")
        return old.yaml_text, current.revision if current else 0

    text, current = _run(nats_url, work)
    _write(
        nats_url,
        text,
        message=message or f"rollback to revision {revision}",
        expect_revision=current,
        wait_s=_APPLIED_WAIT_S,
    )


@app.command()
def edit(nats_url: NatsUrl = DEFAULT_NATS_URL) -> None:
    """Open the stored policy in $EDITOR; it is validated before saving, and re-opened
    with the errors on top until it is valid (or you empty the file to abort)."""

    async def work(store: Any) -> Any:
        return await store.current()

    stored = _run(nats_url, work)
    base = stored.revision if stored else 0
    text = stored.yaml_text if stored else RoutingPolicy().to_yaml()
    editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="tandem-policy-", delete=False
    ) as f:
        f.write(text)
        path = Path(f.name)
    errors = ""
    while True:
        if errors:
            body = path.read_text(encoding="utf-8")
            kept = "".join(
                line for line in body.splitlines(keepends=True) if not line.startswith("#!")
            )
            header = "".join(f"#! {line}\n" for line in errors.splitlines())
            path.write_text(header + kept, encoding="utf-8")
        if subprocess.call([*editor, str(path)]) != 0:
            fail(f"the editor exited with an error; your text is in {path}")
        edited = "".join(
            line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith("#!")
        )  # fmt: skip
        if not edited.strip():
            typer.echo("empty file: nothing changed")
            return
        if edited == text:
            typer.echo("no changes")
            return
        try:
            RoutingPolicy.from_yaml(edited)
        except PolicyError as exc:
            errors = f"invalid policy (fix it, or empty the file to abort):\n{exc}"
            typer.echo(errors, err=True)
            continue
        break
    try:
        _write(nats_url, edited, message="tandem policy edit", expect_revision=base,
               wait_s=_APPLIED_WAIT_S)  # fmt: skip
    except typer.Exit:
        typer.echo(f"your edit is kept in {path}", err=True)
        raise
    path.unlink(missing_ok=True)


# -- explaining -----------------------------------------------------------------


@app.command(name="explain")
def explain_request(
    request_file: Annotated[Path, typer.Argument(help="A chat completion request body (JSON).")],
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="Explain with this policy file.")
    ] = None,
    prompt_tokens: Annotated[
        int | None, typer.Option(help="Skip tokenizing: the prompt is this many tokens.")
    ] = None,
    tenant: Annotated[str, typer.Option(help="The x-tandem-tenant header.")] = "default",
    route_header: Annotated[str | None, typer.Option(help="The x-tandem-route header.")] = None,
    edge_queue: Annotated[int, typer.Option(help="Requests waiting on the edge.")] = 0,
    cloud_workers: Annotated[int, typer.Option(help="Healthy cloud workers.")] = 1,
    complexity: Annotated[
        float | None, typer.Option(help="Classifier score; default: run the classifier.")
    ] = None,
    nats_url: NatsUrl = DEFAULT_NATS_URL,
) -> None:
    """Dry run: which rule routes this request, and why each rule before it did not."""
    from edge.openai_protocol import ChatCompletionRequest
    from edge.routing import Observations, chat_features

    try:
        body = ChatCompletionRequest.model_validate(json.loads(_read_file(request_file)))
    except ValueError as exc:
        fail(f"{request_file} is not a valid chat completion request: {exc}")
    if file is not None:
        try:
            policy = RoutingPolicy.from_yaml(_read_file(file))
        except PolicyError as exc:
            fail(f"{file} is invalid:\n{exc}", code=2)
        source = str(file)
    else:

        async def work(store: Any) -> Any:
            return await store.current()

        stored = _run(nats_url, work)
        if stored is not None and stored.policy is None:
            fail(f"the stored revision {stored.revision} is invalid: {stored.error}")
        policy = stored.policy if stored is not None else RoutingPolicy()
        source = f"revision {stored.revision}" if stored else "built-in default"
    token_ids = _prompt_token_ids(body) if prompt_tokens is None else None
    n_prompt = prompt_tokens if token_ids is None else len(token_ids)
    assert n_prompt is not None
    if complexity is None and policy.uses_complexity and token_ids is not None:
        complexity = _score(token_ids, body)
    headers = {
        "x-tandem-tenant": tenant,
        **({"x-tandem-route": route_header} if route_header else {}),
    }
    features = chat_features(
        body,
        n_prompt,
        headers,
        edge_queue=edge_queue,
        cloud_workers=cloud_workers,
        observations=Observations(),
        complexity=complexity,
    )
    _print_explanation(policy, features, source)


def _prompt_token_ids(body: Any) -> list[int]:
    """The prompt as the edge would tokenize it (vocab-only llama.cpp: no weights loaded)."""
    from edge.engine import LlamaEngine
    from edge.prompts import PromptBuilder
    from edge.settings import EdgeSettings
    from edge.state import engine_config

    config, template = engine_config(EdgeSettings.model_validate({}))
    vocab = LlamaEngine._load(config, vocab_only=True)

    def tokenize(text: str) -> list[int]:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    return PromptBuilder(template, tokenize, config.n_ctx, vocab.n_vocab()).chat_tokens(body)


def _score(token_ids: list[int], body: Any) -> float | None:
    try:
        from router.classifier import ComplexityClassifier
    except ImportError:
        return None
    classifier: Any = ComplexityClassifier.load()
    return float(
        classifier.score(
            token_ids, has_tools=bool(body.active_tools()), n_messages=len(body.messages)
        )
    )


def _print_explanation(policy: RoutingPolicy, features: RequestFeatures, source: str) -> None:
    result = explain(policy, features)
    d = result.decision
    shown = {k: v for k, v in vars(features).items() if v not in (None, False)}
    typer.echo(f"policy: {source}")
    typer.echo("request: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for t in result.trace:
        mark = "MATCH" if t.matched else "skip "
        why = "" if t.matched else " -- " + "; ".join(t.failed)
        typer.echo(f"  {mark} {t.rule}{why}")
    extra = f", max_draft_tokens={d.max_draft_tokens}" if d.max_draft_tokens else ""
    typer.echo(f"route: {d.route} (rule {d.rule}: {d.reason}{extra})")
    if d.fail_reason:
        typer.echo(f"refused: {d.fail_reason}")
