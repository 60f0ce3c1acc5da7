"""The llama.cpp loader: extra buffer types off, library defaults untouched afterwards."""

from __future__ import annotations

import llama_cpp
import numpy as np

from models.bundled import locate_bundled_gguf
from models.llama_loader import load_llama


def test_a_batch_evaluates_and_the_library_defaults_are_restored() -> None:
    llama = load_llama(locate_bundled_gguf(), n_ctx=128, n_threads=1, verbose=False)
    try:
        assert llama.model_params.use_extra_bufts is False
        llama.eval([1, 520, 9531, 198, 26843, 2, 198, 1])  # a batch: crashed with AMX on
        last = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(last, shape=(llama.n_vocab(),))
        assert np.isfinite(logits).all() and logits.std() > 0
    finally:
        llama.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True
