"""`tandem models`: list model pairs, prepare their cloud weights, check their tokenizers.

tandem models list
tandem models prepare smollm2-135m
tandem models check smollm2-135m
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from models import (
    Catalog,
    ModelError,
    ModelPair,
    WeightsNotFoundError,
    cloud_weights_dir,
    edge_gguf_path,
    is_prepared,
    load_template,
    prepare_cloud_weights,
    prepare_edge_weights,
    require_compatible,
)
from tandem.commands.common import HomeOption, fail

app = typer.Typer(
    help="Model pairs: list them, prepare their cloud weights, check their tokenizers.",
    no_args_is_help=True,
)

NameArgument = Annotated[
    str | None,
    typer.Argument(
        show_default=False, help="Model pair name (default: the catalog's default pair)."
    ),
]


@app.command("list")
def list_pairs(home: HomeOption = None) -> None:
    """List the model pairs, their edge GGUF and whether their cloud weights are prepared."""
    with _user_errors():
        catalog = Catalog.load(home)
        default = catalog.default().name
        table = Table(title="Tandem model pairs", caption="* default pair")
        for column in ("pair", "edge GGUF", "cloud", "template", "tools"):
            table.add_column(column, no_wrap=True)
        # Paths are too long for table cells: they follow the table, one per line.
        paths = []
        for name in catalog.names():
            pair = catalog.get(name)
            label = f"{name} *" if name == default else name
            edge_state, edge_where = _edge_state(pair)
            cloud_state, cloud_where = _cloud_state(pair, home)
            table.add_row(label, edge_state, cloud_state, pair.chat_template, pair.tool_parser)
            paths += [f"{name} edge: {edge_where}", f"{name} cloud: {cloud_where}"]
        console = Console(soft_wrap=True)
        console.print(table)
        console.print("\n".join(paths), highlight=False)


@app.command()
def prepare(
    name: NameArgument = None,
    force: Annotated[bool, typer.Option("--force", help="Convert even if up to date.")] = False,
    home: HomeOption = None,
) -> None:
    """Prepare a pair's cloud weights (the edge GGUF dequantized to HF safetensors), and
    its edge weights when the pair's edge layout asks for re-quantized ones (q8_0)."""
    with _user_errors():
        pair = _pair(name, home)
        started = time.perf_counter()
        if pair.edge.layout != "gguf":
            with _stderr().status(f"Re-quantizing the edge weights of {pair.name}..."):
                edge = prepare_edge_weights(pair, home=home, force=force)
            typer.echo(str(edge))
        with _stderr().status(f"Preparing the cloud weights of {pair.name}..."):
            path = prepare_cloud_weights(pair, home=home, force=force)
        _stderr().print(f"{pair.name}: ready in {time.perf_counter() - started:.1f} s")
        typer.echo(str(path))


@app.command()
def check(
    name: NameArgument = None,
    target: Annotated[
        Path | None,
        typer.Option("--target", help="HF model dir to check instead of the pair's cloud weights."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Check that a pair's draft and target share a tokenizer; exit 1 if they do not."""
    with _user_errors():
        pair = _pair(name, home)
        draft = edge_gguf_path(pair)
        if target is None:
            with _stderr().status(f"Preparing the cloud weights of {pair.name}..."):
                target = prepare_cloud_weights(pair, home=home)
        with _stderr().status("Comparing vocabularies..."):
            report = require_compatible(draft, target, load_template(pair.chat_template))
        typer.echo(
            f"{pair.name}: compatible: {report.tokens_compared} token ids and "
            f"{report.samples_compared} sample chats agree "
            f"(vocab {report.n_vocab_draft} draft / {report.n_vocab_target} target)"
        )


def _pair(name: str | None, home: Path | None) -> ModelPair:
    catalog = Catalog.load(home)
    return catalog.get(name) if name else catalog.default()


def _edge_state(pair: ModelPair) -> tuple[str, str]:
    try:
        return "[green]present[/]", escape(str(edge_gguf_path(pair)))
    except WeightsNotFoundError as exc:
        return "[red]missing[/]", escape(str(exc))


def _cloud_state(pair: ModelPair, home: Path | None) -> tuple[str, str]:
    path = escape(str(cloud_weights_dir(pair, home)))
    if is_prepared(pair, home):
        return "[green]prepared[/]", path
    return "[yellow]not prepared[/]", f"{path} (run: tandem models prepare {pair.name})"


def _stderr() -> Console:
    return Console(stderr=True)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    # A user error is one clear line and a non-zero exit, never a traceback.
    try:
        yield
    except ModelError as exc:
        fail(str(exc))
