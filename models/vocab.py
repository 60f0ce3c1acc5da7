"""Check that a draft GGUF and a target HF model share one tokenizer.

Speculative decoding compares token ids: the draft's id 42 must be the same
bytes as the target's id 42, and both must tokenize a rendered chat into the
same ids. Vocabulary sizes may differ (targets often pad the embedding
matrix); ids present in both must agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from models.chat_template import load_template, render_chat
from models.errors import (
    IncompatibleVocabError,
    MissingDependencyError,
    WeightsNotFoundError,
    one_line,
)

log = logging.getLogger(__name__)

MAX_MISMATCHES = 10
SAMPLE_CONVERSATIONS: tuple[tuple[list[dict[str, Any]], list[dict[str, Any]] | None], ...] = (
    ([{"role": "user", "content": "What is the capital of France?"}], None),
    (
        [
            {"role": "system", "content": "You answer in one word. Ünïcödé, 数字 42, emoji 🙂."},
            {"role": "user", "content": "  Spaces,\ttabs\nand newlines  "},
            {"role": "assistant", "content": "Okay."},
            {"role": "user", "content": "def f(x):\n    return x ** 2  # code"},
        ],
        None,
    ),
    (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather of a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
    ),
)


class VocabMismatch(BaseModel):
    """One difference between the draft and target tokenizers."""

    kind: Literal["token", "encoding"]
    where: str
    draft: str
    target: str

    def describe(self) -> str:
        """Return a short human-readable description."""
        return f"{self.where}: draft {self.draft} vs target {self.target}"


class VocabReport(BaseModel):
    """The result of comparing a draft's and a target's tokenizers."""

    compatible: bool
    n_vocab_draft: int
    n_vocab_target: int
    tokens_compared: int
    samples_compared: int
    mismatches: list[VocabMismatch]


def check_vocab_compatible(
    draft_gguf: Path, target_hf_dir: Path, chat_template: str | None = None
) -> VocabReport:
    """Compare the draft GGUF's vocabulary and chat tokenization with the target's."""
    template = chat_template if chat_template is not None else load_template("chatml_tools")
    tokenizer = _load_target_tokenizer(target_hf_dir)
    with contextlib.closing(_load_draft_vocab(draft_gguf)) as llama:
        n_draft, n_target = llama.n_vocab(), len(tokenizer)
        mismatches = _token_mismatches(llama, tokenizer, min(n_draft, n_target))
        mismatches += _encoding_mismatches(llama, tokenizer, template)
    return VocabReport(
        compatible=not mismatches,
        n_vocab_draft=n_draft,
        n_vocab_target=n_target,
        tokens_compared=min(n_draft, n_target),
        samples_compared=len(SAMPLE_CONVERSATIONS),
        mismatches=mismatches[:MAX_MISMATCHES],
    )


def require_compatible(
    draft_gguf: Path, target_hf_dir: Path, chat_template: str | None = None
) -> VocabReport:
    """Like `check_vocab_compatible`, but raise IncompatibleVocabError on any mismatch."""
    report = check_vocab_compatible(draft_gguf, target_hf_dir, chat_template)
    if not report.compatible:
        shown = "; ".join(m.describe() for m in report.mismatches[:3])
        raise IncompatibleVocabError(
            f"draft {draft_gguf.name} and target {target_hf_dir} do not share a tokenizer "
            f"(first differences: {shown}); "
            "draft and target must share a tokenizer for speculative decoding"
        )
    return report


def _load_draft_vocab(path: Path) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        missing = ["llama-cpp-python"]
        raise MissingDependencyError("reading the draft vocabulary", missing, "edge") from exc
    if not path.is_file():
        raise WeightsNotFoundError(f"draft GGUF not found: {path}")
    # Even vocab-only, llama.cpp makes a context and warns that n_ctx exceeds the
    # (absent) training context; that warning goes to stderr despite verbose=False.
    noise = io.StringIO()
    try:
        with contextlib.redirect_stderr(noise):
            return Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise WeightsNotFoundError(
            f"llama.cpp cannot read the draft {path}: {one_line(exc)}"
        ) from exc
    finally:
        log.debug("llama.cpp said: %s", noise.getvalue().strip())


def _load_target_tokenizer(path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("reading the target tokenizer", ["transformers"]) from exc
    if not path.is_dir():
        raise WeightsNotFoundError(f"target model directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"cannot load a tokenizer from {path}: {one_line(exc)}") from exc


def _token_mismatches(llama: Any, tokenizer: Any, n_common: int) -> list[VocabMismatch]:
    draft_bytes = llama_token_bytes(llama)
    target_bytes = _target_token_bytes(tokenizer)
    mismatches = []
    for token_id in range(n_common):
        draft = draft_bytes(token_id)
        target = target_bytes(token_id)
        if draft != target:
            where = f"id {token_id}"
            mismatches.append(
                VocabMismatch(kind="token", where=where, draft=repr(draft), target=repr(target))
            )
            if len(mismatches) >= MAX_MISMATCHES:
                break
    return mismatches


def llama_token_bytes(llama: Any) -> Callable[[int], bytes]:
    """Return a function giving the raw bytes of one token id of a llama.cpp model.

    Each call of the returned function reuses one buffer: give each thread its own.
    """
    import llama_cpp

    # Not Llama.detokenize: it uses a 32-byte buffer and returns b"" for longer
    # pieces (47 SmolLM2 tokens, e.g. a newline and 32 spaces).
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    buffer = ctypes.create_string_buffer(256)

    def token_bytes(token_id: int) -> bytes:
        nonlocal buffer
        size = llama_cpp.llama_token_to_piece(vocab, token_id, buffer, len(buffer), 0, True)
        if size < 0:  # too small: -size is the length needed
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(vocab, token_id, buffer, len(buffer), 0, True)
        return buffer.raw[:size]

    return token_bytes


def llama_tokenizer(llama: Any) -> Callable[[str], list[int]]:
    """Return ``text -> token ids`` for a llama.cpp model: special tokens parsed, no BOS.

    Not ``Llama.tokenize``: it sizes its buffer by the model's training context,
    which a vocab-only load reports as 0, so every call tokenized twice (once to
    learn the size). A token covers at least one byte, so ``len(bytes)`` suffices.
    """
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)

    def tokenize(text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, size, False, True)
        if n < 0:  # more tokens than bytes: not seen, but handled
            size = -n
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, size, False, True)
        return buffer[:n]

    return tokenize


def _target_token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """Return a function giving the raw bytes of one target token id."""
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    byte_decoder = _byte_decoder() if _is_byte_level(tokenizer) else None

    def token_bytes(token_id: int) -> bytes:
        if token_id in added:
            return added[token_id].encode("utf-8")
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if byte_decoder is not None and all(ch in byte_decoder for ch in piece):
            return bytes(byte_decoder[ch] for ch in piece)
        # Not byte-level BPE (e.g. SentencePiece): the decoded text is the best we have.
        return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    return token_bytes


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-unicode map used by byte-level BPE.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def _encoding_mismatches(llama: Any, tokenizer: Any, template: str) -> list[VocabMismatch]:
    mismatches = []
    for index, (messages, tools) in enumerate(SAMPLE_CONVERSATIONS):
        text = render_chat(template, messages, tools=tools, add_generation_prompt=True)
        draft = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        if draft != target:
            position = _first_difference(draft, target)
            mismatches.append(
                VocabMismatch(
                    kind="encoding",
                    where=f"sample chat {index} token {position}",
                    draft=str(draft[position : position + 5]),
                    target=str(target[position : position + 5]),
                )
            )
    return mismatches


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return min(len(a), len(b))
