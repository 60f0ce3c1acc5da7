"""`tandem router`: train the learned complexity classifier, score a request with it.

tandem router train                      # labels (cached), fits, writes $TANDEM_HOME/router/
tandem router train --out router/data    # refresh the model shipped in the package
tandem router score request.json         # P(edge answer != cloud answer) for one chat request
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from edge.errors import EdgeError
from edge.openai_protocol import ChatCompletionRequest
from edge.prompts import PromptBuilder
from models import Catalog, ModelError, ModelPair, edge_gguf_path, load_template
from models.settings import tandem_home
from router.classifier import ComplexityClassifier
from router.errors import ClassifierError
from router.features import STRUCTURAL_FEATURES, structural_features, token_ids_array
from tandem.commands.common import HomeOption, fail

app = typer.Typer(
    help="The router's learned complexity classifier: train it, score requests with it.",
    no_args_is_help=True,
)

PairOption = Annotated[
    str | None,
    typer.Option("--pair", show_default=False, help="Model pair (default: the catalog's default)."),
]


@app.command()
def train(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            show_default=False,
            help="Where to write complexity.onnx and its report (default: $TANDEM_HOME/router).",
        ),
    ] = None,
    pair: PairOption = None,
    alpaca_sdist: Annotated[
        Path | None,
        typer.Option(
            "--alpaca-sdist",
            show_default=False,
            help="alpaca_eval-0.6.6.tar.gz (default: $TANDEM_HOME/data/; get it with "
            "pip download --no-deps --no-binary :all: alpaca-eval==0.6.6).",
        ),
    ] = None,
    mtbench: Annotated[int, typer.Option(help="MT-Bench prompts (turns) to label.")] = 160,
    alpaca: Annotated[int, typer.Option(help="AlpacaEval instructions to label.")] = 480,
    bfcl: Annotated[int, typer.Option(help="BFCL tool-use prompts to label.")] = 120,
    max_tokens: Annotated[int, typer.Option(min=1, help="Answer length compared.")] = 32,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Label only the first N prompts of the (interleaved) sample.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling, splits and fitting.")] = 0,
    home: HomeOption = None,
) -> None:
    """Label public prompts with the edge and cloud models, fit, export ONNX, write the report.

    Labels are cached under $TANDEM_HOME/router/, so a rerun only labels new prompts.
    """
    # Imported here: training needs torch and transformers, the edge does not.
    from router.training.fit import FitSettings
    from router.training.pipeline import TrainSettings
    from router.training.pipeline import train as run_training

    settings = TrainSettings(
        out_dir=out or (home or tandem_home()) / "router",
        pair=pair,
        home=home,
        alpaca_sdist=alpaca_sdist,
        per_source={"mtbench": mtbench, "alpaca": alpaca, "bfcl": bfcl},
        max_tokens=max_tokens,
        limit=limit,
        fit=FitSettings(seed=seed),
    )
    with _user_errors(), _progress() as (progress, tasks):

        def report_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        report = run_training(settings, report_progress)
    held = report["held_out"]
    typer.echo(
        f"{settings.out_dir / 'complexity.onnx'}: held-out ROC-AUC {held['roc_auc']:.3f} "
        f"(structural features only {held['roc_auc_structural_only']:.3f}) on {held['n']} "
        f"prompts; {report['data']['labelled']} labelled"
    )
    table = Table(title="Cloud tokens at equal agreement with cloud-only answers (held out)")
    for column in ("agreement", "classifier", "rules", "saved"):
        table.add_column(column, justify="right")
    for row in held["savings_at_equal_agreement"]:
        table.add_row(
            f"{row['agreement']:.3f}",
            f"{row['classifier_cloud_token_share']:.3f}",
            f"{row['rules_cloud_token_share']:.3f}",
            f"{row['cloud_tokens_saved']:+.1%}",
        )
    Console().print(table)


@app.command()
def score(
    request: Annotated[
        str,
        typer.Argument(help="An OpenAI chat completion request as a JSON file, or - for stdin."),
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", show_default=False, help="ONNX classifier (default: shipped)."),
    ] = None,
    pair: PairOption = None,
    home: HomeOption = None,
) -> None:
    """Print the classifier's P(edge answer != cloud answer) for one chat request."""
    with _user_errors():
        text = sys.stdin.read() if request == "-" else _read(Path(request))
        try:
            chat = ChatCompletionRequest.model_validate(json.loads(text))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            fail(f"not a chat completion request ({where}: {first['msg']})")
        catalog = Catalog.load(home)
        model_pair = catalog.get(pair) if pair else catalog.default()
        classifier = ComplexityClassifier.load(model)
        ids = _prompt_tokens(chat, model_pair)
        has_tools = bool(chat.active_tools())
        p = classifier.score(ids, has_tools=has_tools, n_messages=len(chat.messages))
        features = structural_features(
            token_ids_array(ids), has_tools=has_tools, n_messages=len(chat.messages)
        )
    details = ", ".join(f"{n}={v:.3g}" for n, v in zip(STRUCTURAL_FEATURES, features, strict=True))
    typer.echo(f"{p:.4f}  ({len(ids)} prompt tokens; {details})")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


def _prompt_tokens(chat: ChatCompletionRequest, pair: ModelPair) -> list[int]:
    """The request's prompt token ids, built exactly as the edge builds them."""
    from llama_cpp import Llama

    # The edge tokenizes with a vocab-only llama.cpp model; so does this.
    vocab = Llama(model_path=str(edge_gguf_path(pair)), vocab_only=True, verbose=False)
    try:
        builder = PromptBuilder(
            load_template(pair.chat_template),
            lambda text: list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)),
            pair.edge.n_ctx,
            vocab.n_vocab(),
        )
        return builder.chat_tokens(chat)
    finally:
        vocab.close()


@contextlib.contextmanager
def _progress() -> Iterator[tuple[Progress, dict[str, TaskID]]]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield progress, {}


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    # A user error is one clear line and a non-zero exit, never a traceback.
    try:
        yield
    except (ModelError, ClassifierError, EdgeError) as exc:
        fail(str(exc))
    except json.JSONDecodeError as exc:
        fail(f"invalid JSON: {exc}")
