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

_CONSTRUCTING = threading.Lock()


def load_llama(path: Path | str, *, extra_buffer_types: bool = False, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` (kwargs as ``Llama`` takes them)."""
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
