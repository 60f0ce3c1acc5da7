"""Loading a llama.cpp model for evaluation, with llama.cpp's extra buffer types off.

llama.cpp can move weights into "extra" CPU buffer types (AMX tiles, repacked
layouts) when the CPU has the instructions. With llama-cpp-python 0.3.36 built
natively on an Intel Xeon with AMX (a 2-core VM of this workplace, 2026-12-01),
every evaluation of a batch of two or more tokens crashed the process with a
segmentation fault in ``llama_decode``; with ``use_extra_bufts = false`` the same
build evaluates correctly. The plain CPU kernels also give the same logits on
every x86 machine, which greedy-exactness tests and cross-machine comparisons
rely on. ``extra_buffer_types=True`` restores llama.cpp's default.

``Llama`` builds its model parameters inside its constructor from
``llama_model_default_params``, with no argument for this field, so the loader
hands it defaults with the field set, for the duration of the construction.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from models.errors import NotAModelFileError, WeightsNotFoundError, one_line

_CONSTRUCTING = threading.Lock()
GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path | str) -> Path:
    """``path`` if it is a readable file that starts like a GGUF; else a one-line error
    (``WeightsNotFoundError``, ``NotAModelFileError``) instead of llama.cpp's traceback."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"no GGUF file at {path}")
    try:
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise NotAModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        raise NotAModelFileError(
            f"{path} is not a GGUF model file (it starts with {head!r}, a GGUF with "
            f"{GGUF_MAGIC!r}); pass llama.cpp weights (a .gguf file)"
        )
    return path


def load_llama(path: Path | str, *, extra_buffer_types: bool = False, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` (kwargs as ``Llama`` takes them).
    ``NotAModelFileError`` if the file is not a GGUF or llama.cpp fails to load it."""
    check_gguf(path)
    try:
        return _construct(path, extra_buffer_types=extra_buffer_types, **kwargs)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file: ..."
        raise NotAModelFileError(
            f"llama.cpp could not load {path}: the file is damaged or not a model this "
            f"llama.cpp reads ({one_line(exc)})"
        ) from exc


def _construct(path: Path | str, *, extra_buffer_types: bool, **kwargs: Any) -> Any:
    import llama_cpp
    import llama_cpp.llama as llama_module

    if extra_buffer_types:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _CONSTRUCTING:  # the swap is process-wide: one construction at a time
        llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults
