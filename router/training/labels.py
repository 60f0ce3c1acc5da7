"""Labels for the complexity classifier: does the edge's greedy answer equal the cloud's?

For each prompt the edge model (llama.cpp on the pair's GGUF, the engine the
edge serves with) answers greedily, up to `max_tokens`. The cloud model
(transformers fp32 on the pair's converted weights) then reads prompt + that
answer in ONE teacher-forced forward pass. The edge's answer is exactly the
cloud's greedy answer iff, at every answer position, the cloud's argmax is the
edge's token: both are greedy, so the first mismatch is where the two answers
part, and before it they share every token. The end-of-generation token is part
of the compared answer (the cloud must stop where the edge stopped).

Near-ties: a position where the edge's token is within `NEAR_TIE_LOGIT_MARGIN`
of the cloud's best logit counts as a match. Batched and token-by-token
evaluation already flip such ties inside one engine (FINDINGS: margins < 0.06),
so calling them disagreements would label numeric noise, not difficulty. The
strict count is recorded too.

The matching prefix over the answer length is the speculative-acceptance proxy
(the share of the edge's drafts a greedy verifier would accept in one pass).

Labels are cached as JSON lines (one per prompt, keyed by prompt id and the
sha256 of its token ids), so `tandem router train` only labels new prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.chat_template import render_chat
from router.training.prompts import ChatPrompt

log = logging.getLogger(__name__)

# Bump when the meaning of a label changes, so old caches are not mixed in.
LABEL_VERSION = 1
NEAR_TIE_LOGIT_MARGIN = 0.05
# The edge's answer to an MT-Bench first turn, when it becomes context for the second.
FIRST_ANSWER_TOKENS = 128


@dataclass(frozen=True)
class Label:
    """One labelled prompt: its features' raw inputs and how the edge fared."""

    id: str
    source: str
    prompt_sha256: str
    prompt_token_ids: list[int]
    has_tools: bool
    n_messages: int
    answer_tokens: int  # the edge's answer, end-of-generation token included
    matched_prefix: int  # answer tokens before the first disagreement
    strict_mismatches: int  # positions where the cloud's argmax differs (near-ties included)
    agrees: bool  # the edge's greedy answer is the cloud's (near-ties forgiven)

    @property
    def acceptance(self) -> float:
        """Share of the answer a greedy verifier accepts before the first disagreement."""
        return self.matched_prefix / self.answer_tokens


def prompt_sha256(token_ids: Sequence[int]) -> str:
    """A stable key for a prompt's token ids."""
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()


class EdgeAnswerer:
    """Greedy answers from llama.cpp on the edge GGUF, tokenized as the edge does."""

    def __init__(self, gguf: Path, n_ctx: int) -> None:
        from llama_cpp import llama_vocab_is_eog

        from models.llama_loader import load_llama

        # One thread: steady on a shared machine (FINDINGS), and labels do not depend on it.
        self._llama = load_llama(gguf, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
        self._vocab = self._llama._model.vocab
        self._is_eog_fn = llama_vocab_is_eog
        self.n_ctx = n_ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt, exactly as edge/engine.py tokenizes it."""
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def answer(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The greedy answer, ending with the end-of-generation token if it came."""
        out: list[int] = []
        for token in self._llama.generate(
            prompt, temp=0.0, top_k=0, min_p=0.0, top_p=1.0, repeat_penalty=1.0
        ):
            out.append(token)
            if self._is_eog_fn(self._vocab, token) or len(out) >= max_tokens:
                break
        return out

    def text(self, tokens: list[int]) -> str:
        """Decoded text of answer tokens (end-of-generation dropped)."""
        body = [t for t in tokens if not self._is_eog_fn(self._vocab, t)]
        return self._llama.detokenize(body).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the llama.cpp context."""
        self._llama.close()


class CloudJudge:
    """The cloud model in fp32 (transformers), scoring an edge answer in one pass."""

    def __init__(self, hf_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        self._model.eval()

    def compare(self, prompt: list[int], answer: list[int]) -> tuple[int, int]:
        """(matched prefix length, strict mismatches) of `answer` against greedy decoding."""
        torch = self._torch
        ids = torch.tensor([prompt + answer])
        with torch.inference_mode():
            # Logits at position i predict token i + 1: the answer's predictions
            # sit at positions len(prompt) - 1 .. len(prompt) + len(answer) - 2.
            logits = self._model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(answer) - 1]
        target = torch.tensor(answer)
        best = logits.max(dim=-1).values
        chosen = logits.gather(1, target[:, None])[:, 0]
        strict = logits.argmax(dim=-1) == target
        near = (best - chosen) < NEAR_TIE_LOGIT_MARGIN
        matched = (strict | near).tolist()
        prefix = matched.index(False) if False in matched else len(matched)
        return prefix, int((~strict).sum())


def label_prompt(
    prompt: ChatPrompt, template: str, edge: EdgeAnswerer, cloud: CloudJudge, max_tokens: int
) -> Label | None:
    """Label one prompt; None when it does not fit the edge's context window."""
    messages = [dict(m) for m in prompt.messages]
    if prompt.needs_first_answer:
        first_ids = edge.tokenize(render_chat(template, messages[:1], tools=prompt.tools))
        messages[1]["content"] = edge.text(edge.answer(first_ids, FIRST_ANSWER_TOKENS)).strip()
    ids = edge.tokenize(render_chat(template, messages, tools=prompt.tools))
    if len(ids) + max_tokens > edge.n_ctx:
        return None
    answer = edge.answer(ids, max_tokens)
    prefix, strict_mismatches = cloud.compare(ids, answer)
    return Label(
        id=prompt.id,
        source=prompt.source,
        prompt_sha256=prompt_sha256(ids),
        prompt_token_ids=ids,
        has_tools=bool(prompt.tools),
        n_messages=len(messages),
        answer_tokens=len(answer),
        matched_prefix=prefix,
        strict_mismatches=strict_mismatches,
        agrees=prefix == len(answer),
    )


def read_labels(path: Path) -> tuple[dict[str, Label], set[str]]:
    """Cached labels by prompt id, and the ids skipped as too long.

    A torn last line from an interrupted run is skipped with a warning.
    """
    labels: dict[str, Label] = {}
    skipped: set[str] = set()
    if not path.is_file():
        return labels, skipped
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            if record.get("skipped"):
                skipped.add(record["id"])
                continue
            label = Label(**record)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s:%d: skipping unreadable label (%s)", path, number, exc)
            continue
        labels[label.id] = label
    return labels, skipped


def label_all(
    prompts: Iterable[ChatPrompt],
    cache: Path,
    make_models: Callable[[], tuple[EdgeAnswerer, CloudJudge]],
    template: str,
    max_tokens: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[Label]:
    """Labels of `prompts`, from the cache where present, computed and appended otherwise.

    A prompt that did not fit the context is remembered as such (a line with
    only its id and `"skipped": true`) so reruns do not retry it.
    """
    todo = list(prompts)
    cached, skipped = read_labels(cache)
    missing = [p for p in todo if p.id not in cached and p.id not in skipped]
    if missing:
        edge, cloud = make_models()
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            with cache.open("a", encoding="utf-8") as out:
                for done, prompt in enumerate(missing, 1):
                    label = label_prompt(prompt, template, edge, cloud, max_tokens)
                    if label is None:
                        skipped.add(prompt.id)
                        record: dict[str, Any] = {"id": prompt.id, "skipped": True}
                    else:
                        cached[prompt.id] = label
                        record = asdict(label)
                    out.write(json.dumps(record) + "\n")
                    out.flush()  # an interrupted run keeps what it labelled
                    progress(done, len(missing))
        finally:
            edge.close()
    return [cached[p.id] for p in todo if p.id in cached]
