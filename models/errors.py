"""Errors raised by the models library.

    ModelError
    ├── ModelNotFoundError       unknown catalog name
    ├── CatalogError             models.yaml is unreadable or invalid
    ├── TemplateNotFoundError    no such chat template in models/templates
    ├── TemplateRenderError      a conversation the chat template cannot render
    ├── WeightsNotFoundError     a GGUF (bundled or a path) or an HF dir is missing
    ├── NotAModelFileError       a file given as a GGUF is not one (or llama.cpp cannot load it)
    ├── ConversionError          the edge GGUF could not be turned into HF weights
    ├── IncompatibleVocabError   draft and target tokenizers differ
    └── MissingDependencyError   an optional dependency (torch, transformers...) is absent

Every message is one line a person can act on: the CLI prints it as is.
"""

from __future__ import annotations

from collections.abc import Iterable


def one_line(detail: object) -> str:
    """Collapse a library's (possibly multi-line) message into one line."""
    return " ".join(str(detail).split())


class ModelError(Exception):
    """Base class of every error raised by `models`."""


class ModelNotFoundError(ModelError):
    """A model pair name that the catalog does not know."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"unknown model pair {name!r}; known pairs: {', '.join(self.known) or '(none)'}"
        )


class CatalogError(ModelError):
    """The user catalog file cannot be read or fails validation."""


class TemplateNotFoundError(ModelError):
    """A chat template name with no file in models/templates."""


class TemplateRenderError(ModelError):
    """A conversation that the chat template rejects or cannot render (bad input)."""


class WeightsNotFoundError(ModelError):
    """Model weights that should be on disk are not."""


class NotAModelFileError(ModelError):
    """A file given as llama.cpp weights is not a GGUF, or llama.cpp cannot load it."""


class ConversionError(ModelError):
    """Converting edge weights to the cloud engine's format failed."""


class IncompatibleVocabError(ModelError):
    """The draft and target models do not share a tokenizer."""


class MissingDependencyError(ModelError):
    """An optional dependency needed for this step is not installed."""

    def __init__(self, what: str, missing: Iterable[str], extra: str = "cloud") -> None:
        self.missing = list(missing)
        self.extra = extra
        super().__init__(
            f"{what} needs {', '.join(self.missing)}, which is not installed: "
            f"pip install 'tandem-mesh[{extra}]'"
        )
